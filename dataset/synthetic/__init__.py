"""Synthetic data for tests, benchmarks and the demo, one module per job:

- `shapes`: coloured shapes, their web captions and descriptive recaptions, an ImageFolder tree;
- `bad_inputs`: broken image members (corrupt, truncated, bombs, odd modes, ...);
- `input_shards`: img2dataset-style input tars with `.parquet` and `_stats.json`;
- `training_shards`: shards in the recaption job's `wds/` format for the trainer;
- `web`: DataComp-like metadata and a loopback image server with failing routes;
- `finished_runs`: a finished recaption output, written without a model.
- `tokenizer`: the byte-level BPE tokenizer of the tiny random-weight models.

`python -m dataset.synthetic --help` writes shards or metadata from the command line.
"""
