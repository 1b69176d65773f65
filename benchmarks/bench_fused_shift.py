"""A/B speed of two builds of the fused op (e.g. before / after a kernel change), interleaved.

One process cannot load two builds of the op library (they register the same op names),
so two worker processes are started, one per `custom_ops/` source folder
(TF_PROXYNORM_SOURCE_DIR; each build is cached under its own key), each holding the
tf.functions of benchmarks/bench_norm.py's fused candidate (`GroupNormAct(proxy_norm=True,
implementation="fused")`, ReLU, training mode). The parent asks them in turn, A B B A A B
..., for one timed call of the forward and of the forward + backward; each round's ratio
is B / A, and the result is the median over rounds (load from other processes hits both
alike). While one worker runs, the other waits on its pipe.

    python benchmarks/bench_fused_shift.py --old-rev HEAD~1             # A: HEAD~1, B: checkout
    python benchmarks/bench_fused_shift.py --old-rev HEAD~1 --offset 1e4   # large-offset inputs
    python benchmarks/bench_fused_shift.py --old-src /tmp/a/custom_ops --new-src custom_ops \\
        --shapes 8x56x56x256 --norms gn --rounds 9
    python benchmarks/bench_fused_shift.py --old-rev HEAD~1 --threads 1 --cpu-time  # busy host

On a busy host, an A/A run (--new-src the same folder as A) shows the noise floor; the CPU
time of one intra-op thread is less sensitive to other processes than wall time.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_SHAPES = "8x56x56x256,32x56x56x64,8x28x28x512"


def worker(threads, cpu_time):
    """Reads one JSON request per line: {"shape", "norm", "offset", "calls"}; answers with
    {"fwd": [seconds], "fwd_bwd": [seconds]} of `calls` timed calls each (wall time, or the
    process's CPU time with `cpu_time`)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(HERE))
    import numpy as np
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)

    import bench_norm
    import tf_proxynorm as tfpn

    if not tfpn.fused_op_available():
        print(json.dumps({"error": tfpn.fused.unavailable_reason()}), flush=True)
        return 1
    print(json.dumps({"library": str(tfpn.fused.library_path())}), flush=True)
    clock = time.process_time if cpu_time else time.perf_counter

    def timed(fn, *args):
        start = clock()
        fn(*args)  # CPU tf.functions run synchronously
        return clock() - start

    cache = {}
    for line in sys.stdin:
        request = json.loads(line)
        key = (tuple(request["shape"]), request["norm"], request["offset"])
        if key not in cache:
            shape = key[0]
            rng = np.random.default_rng(0)
            x = tf.constant(rng.standard_normal(shape, dtype=np.float32) * 2.0 + 0.5
                            + np.float32(request["offset"]))
            dy = tf.constant(rng.standard_normal(shape, dtype=np.float32))
            fwd, fwd_bwd = bench_norm.make_candidates(
                shape, bench_norm.NORMS[request["norm"]], [bench_norm.FUSED])[bench_norm.FUSED]
            for _ in range(3):  # trace and warm up
                fwd(x)
                fwd_bwd(x, dy)
            cache[key] = (fwd, fwd_bwd, x, dy)
        fwd, fwd_bwd, x, dy = cache[key]
        out = {"fwd": [], "fwd_bwd": []}
        for _ in range(request["calls"]):
            out["fwd"].append(timed(fwd, x))
            out["fwd_bwd"].append(timed(fwd_bwd, x, dy))
        print(json.dumps(out), flush=True)
    return 0


class Worker:
    def __init__(self, label, source, options):
        env = dict(os.environ, TF_PROXYNORM_SOURCE_DIR=str(source), TF_CPP_MIN_LOG_LEVEL="2")
        self.label = label
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"] + options, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = json.loads(self.proc.stdout.readline())
        if "error" in hello:
            raise RuntimeError(f"{label}: the fused op is unavailable: {hello['error']}")
        print(f"{label}: {source} -> {hello['library']}", flush=True)

    def ask(self, **request):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def export_rev(rev, folder):
    """`custom_ops/` of git revision `rev` of this checkout, extracted into `folder`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "custom_ops"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return Path(folder) / "custom_ops"


def main(argv=None):
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    old = parser.add_mutually_exclusive_group()
    old.add_argument("--old-rev", default="HEAD", help="git revision of build A (default HEAD)")
    old.add_argument("--old-src", default=None, help="custom_ops/ folder of build A")
    parser.add_argument("--new-src", default=str(ROOT / "custom_ops"),
                        help="custom_ops/ folder of build B (default: the checkout's)")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="NxHxWxC,... (NHWC)")
    parser.add_argument("--norms", default="gn,ln,in", help="subset of gn,ln,in")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=2, help="timed calls per turn (median)")
    parser.add_argument("--offset", type=float, default=0.0, help="added to x (mean offset)")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads of the workers (default: TensorFlow's)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time the workers' CPU time instead of wall time (less sensitive "
                             "to other processes; use with --threads 1)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.threads, args.cpu_time)
    options = [f"--threads={args.threads}"] + (["--cpu-time"] if args.cpu_time else [])
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    norms = args.norms.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        old_src = Path(args.old_src) if args.old_src else export_rev(args.old_rev, tmp)
        workers = {"A": Worker("A (old)", old_src, options),
                   "B": Worker("B (new)", Path(args.new_src), options)}
        print(f"{'CPU' if args.cpu_time else 'wall'} time, intra-op threads "
              f"{args.threads or 'default'}, offset {args.offset:g}, {args.rounds} rounds of "
              f"{args.calls} calls; ms are "
              "medians over rounds, B/A the median of per-round ratios, best B/A the ratio "
              "of the fastest rounds")
        print(f"{'shape':>14s} {'norm':>4s} {'fwd A':>8s} {'fwd B':>8s} {'B/A':>6s} "
              f"{'best':>6s} {'f+b A':>8s} {'f+b B':>8s} {'B/A':>6s} {'best':>6s}")
        rows = []
        for shape in shapes:
            for norm in norms:
                request = dict(shape=shape, norm=norm, offset=args.offset, calls=args.calls)
                for w in workers.values():
                    w.ask(**dict(request, calls=1))  # build, trace, warm up
                times = {k: {"fwd": [], "fwd_bwd": []} for k in workers}
                start = time.monotonic()
                for r in range(args.rounds):
                    for k in ("AB" if r % 2 == 0 else "BA"):
                        out = workers[k].ask(**request)
                        for key in ("fwd", "fwd_bwd"):
                            times[k][key].append(float(np.median(out[key])))
                row = {"shape": shape, "norm": norm}
                for key in ("fwd", "fwd_bwd"):
                    a, b = np.array(times["A"][key]), np.array(times["B"][key])
                    row[key] = (float(np.median(a)), float(np.median(b)),
                                float(np.median(b / a)), float(np.min(b) / np.min(a)))
                rows.append(row)
                f, fb = row["fwd"], row["fwd_bwd"]
                print(f"{'x'.join(map(str, shape)):>14s} {norm:>4s} {1e3 * f[0]:8.2f} "
                      f"{1e3 * f[1]:8.2f} {f[2]:6.3f} {f[3]:6.3f} {1e3 * fb[0]:8.2f} "
                      f"{1e3 * fb[1]:8.2f} {fb[2]:6.3f} {fb[3]:6.3f}   "
                      f"({time.monotonic() - start:.0f} s)", flush=True)
        ratios = {key: [r[key][2] for r in rows] for key in ("fwd", "fwd_bwd")}
        print(f"geometric mean of the median ratios: fwd "
              f"{np.exp(np.mean(np.log(ratios['fwd']))):.3f}, fwd+bwd "
              f"{np.exp(np.mean(np.log(ratios['fwd_bwd']))):.3f}")
        for w in workers.values():
            w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
