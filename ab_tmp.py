import subprocess, sys, tempfile, time
from pathlib import Path
from benchmarks import control_plane as cp

LATENCY = 0.03


def slow_throughput(argv, name, n):
    """The benchmark's throughput run with LATENCY added to each of the driver's storage requests (workers untouched)."""
    from dataset import storage
    count = storage._count

    def slow(kind):
        time.sleep(LATENCY)
        count(kind)
    storage._count = slow
    return cp.throughput(argv, name, n)


def main():
    from recaption.tiny import build_tiny_llava
    work = Path(tempfile.mkdtemp(prefix="ab-"))
    model = str(build_tiny_llava(work / "model"))
    template = cp.Template(work / "template")
    n = int(sys.argv[1])
    for i, version in enumerate(sys.argv[2:]):
        subprocess.run(["git", "show", f"{version}:recaption/scheduler.py"], check=True,
                       stdout=open("recaption/scheduler.py", "w"))
        inputs, out = str(work / f"ab{i}/shards"), str(work / f"ab{i}/out")
        cp.write_inputs(inputs, n, template)
        r = cp.in_fresh_process(slow_throughput, cp.run_argv(inputs, out, model, "run"), "local+30ms", n)
        print(version, f"{r.shards_per_s:.1f} shards/s over {r.span_s:.1f} s", flush=True)
    subprocess.run(["git", "checkout", "recaption/scheduler.py"], check=True)


if __name__ == "__main__":
    main()
