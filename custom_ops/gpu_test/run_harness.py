#!/usr/bin/env python3
"""Standalone harness of the CUDA kernel core (custom_ops/cuda) through its C API.

  python custom_ops/gpu_test/run_harness.py --check            # correctness grid (GPU)
  python custom_ops/gpu_test/run_harness.py --bench            # ResNet-50 shapes (GPU)
  python custom_ops/gpu_test/run_harness.py --check --quick    # smaller grid
  python custom_ops/gpu_test/run_harness.py --check --emulate  # same kernels, CPU emulator

Backends: PyTorch CUDA tensors (default when torch sees a GPU), CuPy (--backend cupy), or
the CPU emulator (--emulate: g++ build of the same kernel source, NumPy arrays, no GPU).
The library is built with `make` in this directory unless --no-build is given.

--check compares the forward (y, mean, inv_std) and the backward (dx, dgamma, dbeta,
dproxy_mean, dproxy_inv_std, with the forward's own mean/inv_std as TensorFlow passes them)
with the float64 reference of reference_np.py, with tolerances scaled to the dtype only:
inputs whose mean is up to 1e4 times their std (cases with `offset`) must keep the same
accuracy; prints PASS/FAIL per case and a summary; the exit code is 1 when a case fails.

--bench times forward and forward+backward with CUDA events (median of --iters runs after
warm-up) and reports the bandwidth efficiency against a device-to-device copy measured in
the same run: efficiency = (bytes of the model / time) / (copy bandwidth), with the model
2 S for the forward (read x, write y) and 5 S for forward+backward (read x, write y; read x
and dy, write dx), S the tensor's bytes.
"""

import argparse
import ctypes
import itertools
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import reference_np as ref  # noqa: E402

DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}
ACTS = ref.ACTIVATIONS
# Relative tolerance of the tensor outputs (y, dx): about 2 ulp of the storage type.
OUT_RTOL = {"float32": 3e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
SUM_RTOL = 1e-4  # float32 sums, relative to the sum of |terms|
STAT_RTOL = 3e-5  # mean (relative to std) and inv_std (relative)


class Problem(ctypes.Structure):
    _fields_ = [
        ("n", ctypes.c_int64),
        ("c", ctypes.c_int64),
        ("positions", ctypes.c_int64),
        ("groups", ctypes.c_int32),
        ("channels_last", ctypes.c_int32),
        ("activation", ctypes.c_int32),
        ("use_proxy", ctypes.c_int32),
        ("dtype", ctypes.c_int32),
        ("epsilon", ctypes.c_float),
        ("chunk_bytes", ctypes.c_int64),
    ]


def load_library(path):
    lib = ctypes.CDLL(path)
    P = ctypes.POINTER(Problem)
    vp = ctypes.c_void_p
    lib.tfpn_group_norm_act_fwd_workspace_size.argtypes = [P]
    lib.tfpn_group_norm_act_fwd_workspace_size.restype = ctypes.c_size_t
    lib.tfpn_group_norm_act_bwd_workspace_size.argtypes = [P]
    lib.tfpn_group_norm_act_bwd_workspace_size.restype = ctypes.c_size_t
    lib.tfpn_group_norm_act_fwd.argtypes = [P] + [vp] * 9 + [ctypes.c_size_t, vp]
    lib.tfpn_group_norm_act_fwd.restype = ctypes.c_int
    lib.tfpn_group_norm_act_bwd.argtypes = [P] + [vp] * 14 + [ctypes.c_size_t, vp]
    lib.tfpn_group_norm_act_bwd.restype = ctypes.c_int
    lib.tfpn_last_error.restype = ctypes.c_char_p
    lib.tfpn_cuda_check.argtypes = [ctypes.POINTER(ctypes.c_int)] * 2
    lib.tfpn_cuda_check.restype = ctypes.c_int
    return lib


# ---------------------------------------------------------------------------------------
# Storage in the kernel's dtype, as NumPy arrays on the host (bfloat16 as uint16 bits).

def to_storage(a, dtype):
    a = np.asarray(a, np.float32)
    if dtype == "float32":
        return a.copy()
    if dtype == "float16":
        return a.astype(np.float16)
    return ref.float_to_bf16_bits(a)


def from_storage(s, dtype):
    if dtype == "bfloat16":
        return ref.bf16_bits_to_float(s).astype(np.float64)
    return np.asarray(s).astype(np.float64)


# ---------------------------------------------------------------------------------------
# Backends: device memory, stream, timing.

class EmuBackend:
    """NumPy arrays on the host; the kernels run on the CPU emulator."""

    name = "emulator"
    stream = None

    def upload(self, a):
        return np.ascontiguousarray(a).copy()

    def empty(self, shape, np_dtype):
        # NaN (bfloat16: a NaN bit pattern) so that an element never written fails the check.
        return np.full(shape, np.nan if np.dtype(np_dtype).kind == "f" else 0x7FC0, np_dtype)

    def workspace(self, nbytes):
        buf = np.full(max(int(nbytes), 1) + 256, 0xA5, np.uint8)
        off = (-buf.ctypes.data) % 256
        return buf[off:off + max(int(nbytes), 1)]

    def offset_view(self, a):
        """A view of a 1-element-larger array starting one element in (misaligned)."""
        big = np.zeros(a.size + 1, a.dtype)
        big[1:] = a.reshape(-1)
        return big[1:].reshape(a.shape)

    def ptr(self, a):
        return ctypes.c_void_p(a.ctypes.data) if a is not None else None

    def download(self, a):
        return np.array(a)

    def sync(self):
        pass


class TorchBackend:
    name = "torch"

    def __init__(self):
        import torch
        self.torch = torch
        if not torch.cuda.is_available():
            raise RuntimeError("PyTorch sees no CUDA device")
        self.device = torch.device("cuda")

    @property
    def stream(self):
        return ctypes.c_void_p(self.torch.cuda.current_stream().cuda_stream)

    def _tdtype(self, np_dtype):
        t = self.torch
        return {np.dtype(np.float32): t.float32, np.dtype(np.float16): t.float16,
                np.dtype(np.uint16): t.int16, np.dtype(np.uint8): t.uint8,
                np.dtype(np.int64): t.int64}[np.dtype(np_dtype)]

    def upload(self, a):
        a = np.ascontiguousarray(a)
        if a.dtype == np.uint16:
            a = a.view(np.int16)
        return self.torch.from_numpy(a.copy()).to(self.device)

    def empty(self, shape, np_dtype):
        t = self.torch.empty(tuple(shape), dtype=self._tdtype(np_dtype), device=self.device)
        t.fill_(float("nan") if t.is_floating_point() else 0x7FC0)  # never-written -> NaN
        return t

    def workspace(self, nbytes):
        t = self.torch.empty(max(int(nbytes), 1), dtype=self.torch.uint8, device=self.device)
        t.fill_(0xA5)
        return t

    def offset_view(self, a):
        flat = self.torch.empty(a.numel() + 1, dtype=a.dtype, device=self.device)
        flat[1:].copy_(a.reshape(-1))
        return flat[1:].view(a.shape)

    def ptr(self, a):
        return ctypes.c_void_p(a.data_ptr()) if a is not None else None

    def download(self, a):
        a = a.detach().cpu()
        if a.dtype == self.torch.int16:
            return a.numpy().view(np.uint16)
        return a.numpy()

    def sync(self):
        self.torch.cuda.synchronize()

    def timer(self):
        return self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)

    def copy(self, dst, src):
        dst.copy_(src)


class CupyBackend(TorchBackend):
    name = "cupy"

    def __init__(self):
        import cupy
        self.cp = cupy
        cupy.cuda.runtime.getDeviceCount()

    @property
    def stream(self):
        return ctypes.c_void_p(self.cp.cuda.get_current_stream().ptr)

    def upload(self, a):
        return self.cp.asarray(np.ascontiguousarray(a))

    def empty(self, shape, np_dtype):
        a = self.cp.empty(tuple(shape), dtype=np_dtype)
        a.fill(np.nan if np.dtype(np_dtype).kind == "f" else 0x7FC0)
        return a

    def workspace(self, nbytes):
        a = self.cp.empty(max(int(nbytes), 1), dtype=np.uint8)
        a.fill(0xA5)
        return a

    def offset_view(self, a):
        flat = self.cp.empty(a.size + 1, dtype=a.dtype)
        flat[1:] = a.reshape(-1)
        return flat[1:].reshape(a.shape)

    def ptr(self, a):
        return ctypes.c_void_p(a.data.ptr) if a is not None else None

    def download(self, a):
        return self.cp.asnumpy(a)

    def sync(self):
        self.cp.cuda.get_current_stream().synchronize()

    def timer(self):
        return self.cp.cuda.Event(), self.cp.cuda.Event()

    def copy(self, dst, src):
        dst[...] = src


def elapsed_ms(backend, start, end):
    if backend.name == "cupy":
        return backend.cp.cuda.get_elapsed_time(start, end)
    return start.elapsed_time(end)


# ---------------------------------------------------------------------------------------
# One call of the op through the C API.

class Runner:
    def __init__(self, lib, backend):
        self.lib = lib
        self.be = backend

    def _check(self, rc, what):
        if rc != 0:
            raise RuntimeError(f"{what} failed ({rc}): {self.lib.tfpn_last_error().decode()}")

    def problem(self, shape, dtype, groups, channels_last, act, use_proxy, epsilon=1e-3,
                chunk_bytes=0):
        n = shape[0]
        c = shape[-1] if channels_last else shape[1]
        positions = int(np.prod(shape[1:])) // c if c else 0
        return Problem(n, c, positions, groups, int(channels_last), ACTS[act], int(use_proxy),
                       DTYPES[dtype], epsilon, chunk_bytes)

    def forward(self, pr, x, params, out_shape, storage_dtype):
        be = self.be
        y = be.empty(out_shape, storage_dtype)
        mean = be.empty((pr.n, pr.groups), np.float32)
        inv = be.empty((pr.n, pr.groups), np.float32)
        nbytes = self.lib.tfpn_group_norm_act_fwd_workspace_size(ctypes.byref(pr))
        ws = be.workspace(nbytes)
        return self.forward_into(pr, x, params, y, mean, inv, ws, nbytes)

    def forward_into(self, pr, x, params, y, mean, inv, ws, nbytes):
        be = self.be
        g, b, pm, pi = params
        rc = self.lib.tfpn_group_norm_act_fwd(
            ctypes.byref(pr), be.ptr(x), be.ptr(g), be.ptr(b), be.ptr(pm), be.ptr(pi),
            be.ptr(y), be.ptr(mean), be.ptr(inv), be.ptr(ws), nbytes, be.stream)
        self._check(rc, "forward")
        return y, mean, inv

    def backward(self, pr, dy, x, params, mean, inv, storage_dtype):
        be = self.be
        dx = be.empty(tuple(x.shape), storage_dtype)
        grads = [be.empty((pr.c,), np.float32) for _ in range(4)]
        nbytes = self.lib.tfpn_group_norm_act_bwd_workspace_size(ctypes.byref(pr))
        ws = be.workspace(nbytes)
        return self.backward_into(pr, dy, x, params, mean, inv, dx, grads, ws, nbytes)

    def backward_into(self, pr, dy, x, params, mean, inv, dx, grads, ws, nbytes):
        be = self.be
        g, b, pm, pi = params
        rc = self.lib.tfpn_group_norm_act_bwd(
            ctypes.byref(pr), be.ptr(dy), be.ptr(x), be.ptr(g), be.ptr(b), be.ptr(pm),
            be.ptr(pi), be.ptr(mean), be.ptr(inv), be.ptr(dx), *[be.ptr(t) for t in grads],
            be.ptr(ws), nbytes, be.stream)
        self._check(rc, "backward")
        return dx, grads


# ---------------------------------------------------------------------------------------
# --check

def storage_np_dtype(dtype):
    return {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[dtype]


def check_grid(quick):
    """(shape, channels_last, groups list) covering ranks 2-5, both layouts, odd shapes,
    vector and scalar paths, multi-split reductions and the finalization team sizes."""
    cases = [
        ((4, 32), True, [1, 4, 32]),
        ((3, 12), False, [1, 3, 12]),
        ((2, 9, 16), True, [1, 2, 16]),
        ((2, 16, 9), False, [1, 2, 16]),
        ((3, 5, 7, 12), True, [1, 2, 12]),
        ((3, 12, 5, 7), False, [1, 2, 12]),
        ((2, 6, 5, 64), True, [1, 2, 32, 64]),
        ((2, 64, 4, 4), False, [1, 2, 32, 64]),
        ((1, 7, 7, 64), True, [1, 32]),
        ((2, 3, 4, 5, 8), True, [1, 2, 8]),
        ((2, 8, 3, 4, 5), False, [1, 2, 8]),
        ((2, 40, 40, 16), True, [1, 4, 16]),      # several splits per channel
        ((2, 8, 64, 64), False, [1, 2, 8]),       # several splits per row
        ((2, 3, 3, 256), True, [256]),            # IN, many groups, one value per thread
        ((2, 50, 50, 32), True, [1]),             # LN, block-wide finalization team
        ((2, 2, 5, 7, 3), False, [1]),            # rank 5 channels-first, tiny
        ((2, 5, 3, 6), True, [1, 3, 6]),          # C % 4 != 0: scalar path
        ((4, 10), True, [1, 2, 10]),
        ((2, 30, 30, 6), True, [1, 2]),           # scalar path with several splits
    ]
    if quick:
        cases = [cases[i] for i in (0, 3, 4, 5, 6, 7, 11, 12, 14, 16)]
    return cases


def make_inputs(rng, shape, channels_last, dtype, offset):
    c = shape[-1] if channels_last else shape[1]
    cshape = [1] * len(shape)
    cshape[-1 if channels_last else 1] = c
    chan_bias = rng.normal(size=c).reshape(cshape) * 0.5
    x = rng.normal(size=shape) * 1.5 + chan_bias + offset
    dy = rng.normal(size=shape)
    gamma = 1.0 + 0.3 * rng.normal(size=c)
    beta = 0.3 * rng.normal(size=c)
    pm = 0.3 * rng.normal(size=c)
    pinv = 1.0 + 0.2 * rng.random(size=c)
    xs, dys = to_storage(x, dtype), to_storage(dy, dtype)
    params = [np.asarray(v, np.float32) for v in (gamma, beta, pm, pinv)]
    return xs, dys, params


def rel_err(out, want, atol):
    """max |out - want| / (atol + |want|): relative error with an absolute floor."""
    return float(np.max(np.abs(out - want) / (atol + np.abs(want)))) if want.size else 0.0


def run_case(runner, rng, shape, channels_last, groups, dtype, act, use_proxy, offset=0.0,
             chunk_bytes=0, misaligned=False, eps=1e-3):
    be = runner.be
    xs, dys, params = make_inputs(rng, shape, channels_last, dtype, offset)
    x64, dy64 = from_storage(xs, dtype), from_storage(dys, dtype)
    p64 = [v.astype(np.float64) for v in params]
    pr = runner.problem(shape, dtype, groups, channels_last, act, use_proxy, eps, chunk_bytes)
    sdt = storage_np_dtype(dtype)

    x_d, dy_d = be.upload(xs), be.upload(dys)
    if misaligned:
        x_d, dy_d = be.offset_view(x_d), be.offset_view(dy_d)
    par_d = [be.upload(v) for v in params]
    y_d, mean_d, inv_d = runner.forward(pr, x_d, par_d, shape, sdt)
    dx_d, g_d = runner.backward(pr, dy_d, x_d, par_d, mean_d, inv_d, sdt)
    be.sync()
    y = from_storage(be.download(y_d), dtype)
    mean = be.download(mean_d).astype(np.float64)
    inv = be.download(inv_d).astype(np.float64)
    dx = from_storage(be.download(dx_d), dtype)
    grads = [be.download(t).astype(np.float64) for t in g_d]

    kw = dict(groups=groups, epsilon=eps, activation=act, channels_last=channels_last,
              use_proxy=use_proxy)
    y_ref, mean_ref, inv_ref, _ = ref.forward(x64, *p64, **kw)
    bw = ref.backward(dy64, x64, *p64, **kw)
    # No allowance for the conditioning max |mean| * inv_std: the kernels centre x on the
    # mean to float32 rounding of the deviations (pilot-shifted statistics, mean_lo), so a
    # mean of 1e4 std costs nothing. (The float32 mean output itself is rounded to half an
    # ulp of |mean|, a relative error of 6e-8 as rel_err measures it.)
    errs = {}
    rms_y = float(np.sqrt(np.mean(y_ref ** 2))) if y_ref.size else 1.0
    errs["y"] = rel_err(y, y_ref, max(rms_y, 1e-6)) / OUT_RTOL[dtype]
    errs["mean"] = rel_err(mean, mean_ref, 1.0 / inv_ref) / STAT_RTOL
    errs["inv_std"] = rel_err(inv, inv_ref, 0.0) / STAT_RTOL
    # dx: elements whose pre-activation sits at a kink of relu/leaky_relu may legitimately
    # take the other side in float32; they are left out.
    mask = np.ones(y_ref.shape, bool)
    if act in ("relu", "leaky_relu"):
        a_full = ref.from_npc(bw["a"], shape, channels_last)
        mask = np.abs(a_full) > 1e-3
    scale = float(np.sqrt(np.mean(bw["dx_scale"] ** 2))) if dx.size else 1.0
    tol_dx = OUT_RTOL[dtype]
    errs["dx"] = rel_err(dx[mask], bw["dx"][mask], max(scale, 1e-6)) / tol_dx
    for name, got in zip(("dgamma", "dbeta", "dproxy_mean", "dproxy_inv_std"), grads):
        want = bw[name]
        atol = bw["abs_sums"][name] + 1e-30
        err = np.max(np.abs(got - want) / atol) if want.size else 0.0
        if not use_proxy and name.startswith("dproxy"):
            err = float(np.max(np.abs(got))) * 1e30 if got.size else 0.0  # must be exact zeros
        errs[name] = float(err) / SUM_RTOL
    finite = all(np.all(np.isfinite(v)) for v in (y, mean, inv, dx, *grads))
    worst = max(errs.values()) if errs else 0.0
    return finite and worst <= 1.0, errs


def cmd_check(runner, args):
    rng = np.random.default_rng(args.seed)
    dtypes = args.dtypes
    acts = args.acts
    results = []
    cases = []
    for shape, cl, groups_list in check_grid(args.quick):
        for groups, dtype in itertools.product(groups_list, dtypes):
            for use_proxy in (False, True):
                for act in acts:
                    cases.append(dict(shape=shape, channels_last=cl, groups=groups, dtype=dtype,
                                      act=act, use_proxy=use_proxy))
    # Extras: large mean offsets (fp32: 1e4), chunked launches, misaligned pointers,
    # batch 1.
    for dtype in dtypes:
        off = {"float32": 1e4, "float16": 300.0, "bfloat16": 300.0}[dtype]
        cases.append(dict(shape=(2, 7, 9, 16), channels_last=True, groups=4, dtype=dtype,
                          act="silu", use_proxy=True, offset=off))
        cases.append(dict(shape=(2, 16, 7, 9), channels_last=False, groups=16, dtype=dtype,
                          act="gelu", use_proxy=True, offset=off))
        cases.append(dict(shape=(5, 6, 6, 32), channels_last=True, groups=8, dtype=dtype,
                          act="relu", use_proxy=True, chunk_bytes=1))
        cases.append(dict(shape=(5, 32, 6, 6), channels_last=False, groups=8, dtype=dtype,
                          act="leaky_relu", use_proxy=False, chunk_bytes=2 * 32 * 36 * 4))
        cases.append(dict(shape=(3, 4, 4, 32), channels_last=True, groups=4, dtype=dtype,
                          act="gelu", use_proxy=True, misaligned=True))
        cases.append(dict(shape=(3, 32, 4, 4), channels_last=False, groups=4, dtype=dtype,
                          act="relu", use_proxy=True, misaligned=True))
        cases.append(dict(shape=(1, 9, 9, 128), channels_last=True, groups=32, dtype=dtype,
                          act="silu", use_proxy=True))
    # Large offsets (issue 21): mean 1e2..1e4 times the std, GN / LN / IN, both layouts,
    # several splits per (example, channel) (P = 400 positions), float32 (a 16-bit x
    # cannot hold N(1e4, 1)).
    if "float32" in dtypes:
        for off, (groups, act), cl in itertools.product(
                (1e2, 1e3, 1e4), ((8, "gelu"), (1, "relu"), (32, "silu")), (True, False)):
            shape = (2, 20, 20, 32) if cl else (2, 32, 20, 20)
            cases.append(dict(shape=shape, channels_last=cl, groups=groups, dtype="float32",
                              act=act, use_proxy=groups != 1, offset=off))
    if args.quick:
        # Quick: every activation still runs, spread over the shapes.
        keep = []
        for i, c in enumerate(cases):
            extra = any(k in c for k in ("offset", "chunk_bytes", "misaligned"))
            if extra or c["act"] == acts[i // 2 % len(acts)]:
                keep.append(c)
        cases = keep
    if args.limit:
        cases = cases[:args.limit]
    t0 = time.time()
    for c in cases:
        label = (f"{c['dtype']:8s} {str(c['shape']):18s} {'NHWC' if c['channels_last'] else 'NCHW'}"
                 f" G={c['groups']:<3d} {c['act']:10s} pn={int(c['use_proxy'])}")
        for k in ("offset", "chunk_bytes", "misaligned"):
            if k in c:
                label += f" {k}={c[k]}"
        try:
            ok, errs = run_case(runner, rng, **c)
            worst = max(errs, key=errs.get)
            msg = f"worst {worst}={errs[worst]:.3f}"
        except Exception as e:  # noqa: BLE001 - reported as a failure
            ok, msg = False, f"error: {e}"
        results.append(ok)
        if not ok or args.verbose:
            print(f"{'PASS' if ok else 'FAIL'} {label}  {msg}", flush=True)
    n_fail = results.count(False)
    print(f"\n{len(results) - n_fail}/{len(results)} cases passed "
          f"({runner.be.name}, {time.time() - t0:.1f} s); errors are in units of the "
          f"tolerance (<= 1 passes)")
    return 1 if n_fail else 0


# ---------------------------------------------------------------------------------------
# --bench

def time_fn(be, fn, iters, warmup=3):
    for _ in range(warmup):
        fn()
    be.sync()
    times = []
    for _ in range(iters):
        start, end = be.timer()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(elapsed_ms(be, start, end))
    return float(np.median(times))


def cmd_bench(runner, args):
    be = runner.be
    if be.name == "emulator":
        print("--bench needs a GPU (the emulator has no meaningful timings)")
        return 2
    batches = [32] if args.quick else [8, 32]
    spatial = [(56, 56, 256)] if args.quick else [(56, 56, 256), (28, 28, 512), (14, 14, 1024),
                                                  (7, 7, 2048)]
    dtypes = [d for d in args.dtypes if d in ("float32", "bfloat16")] or ["float32"]
    act = args.bench_act
    rng = np.random.default_rng(0)
    print(f"act={act} proxy={not args.no_proxy} channels_last={not args.channels_first} "
          f"chunk_bytes={args.chunk_bytes} iters={args.iters}")
    header = (f"{'shape':20s} {'dtype':8s} {'norm':5s} {'copy GB/s':>9s} {'fwd us':>8s} "
              f"{'fwd eff':>7s} {'f+b us':>8s} {'f+b eff':>7s}")
    print(header)
    print("-" * len(header))
    for n, (h, w, c), dtype in itertools.product(batches, spatial, dtypes):
        shape = (n, h, w, c) if not args.channels_first else (n, c, h, w)
        sdt = storage_np_dtype(dtype)
        xs, dys, params = make_inputs(rng, shape, not args.channels_first, dtype, 0.0)
        x_d, dy_d = be.upload(xs), be.upload(dys)
        par_d = [be.upload(v) for v in params]
        s_bytes = xs.nbytes
        # Copy baseline: reads and writes S.
        dst = be.empty(shape, sdt)
        t_copy = time_fn(be, lambda: be.copy(dst, x_d), args.iters)
        copy_bw = 2 * s_bytes / (t_copy * 1e-3)
        for norm, groups in (("GN32", 32), ("LN", 1), ("IN", c)):
            pr = runner.problem(shape, dtype, groups, not args.channels_first, act,
                                not args.no_proxy, 1e-5, args.chunk_bytes)
            y = be.empty(shape, sdt)
            mean = be.empty((n, groups), np.float32)
            inv = be.empty((n, groups), np.float32)
            fb = runner.lib.tfpn_group_norm_act_fwd_workspace_size(ctypes.byref(pr))
            bb = runner.lib.tfpn_group_norm_act_bwd_workspace_size(ctypes.byref(pr))
            fws, bws = be.workspace(fb), be.workspace(bb)
            dx = be.empty(shape, sdt)
            grads = [be.empty((c,), np.float32) for _ in range(4)]

            def fwd():
                runner.forward_into(pr, x_d, par_d, y, mean, inv, fws, fb)

            def fwd_bwd():
                fwd()
                runner.backward_into(pr, dy_d, x_d, par_d, mean, inv, dx, grads, bws, bb)

            t_f = time_fn(be, fwd, args.iters)
            t_fb = time_fn(be, fwd_bwd, args.iters)
            eff_f = 2 * s_bytes / (t_f * 1e-3) / copy_bw
            eff_fb = 5 * s_bytes / (t_fb * 1e-3) / copy_bw
            print(f"{str(shape):20s} {dtype:8s} {norm:5s} {copy_bw / 1e9:9.0f} {t_f * 1e3:8.1f} "
                  f"{eff_f:7.0%} {t_fb * 1e3:8.1f} {eff_fb:7.0%}", flush=True)
    return 0


# ---------------------------------------------------------------------------------------

def build(target, extra_env=None):
    env = dict(os.environ, **(extra_env or {}))
    cmd = ["make", "-C", HERE, target]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="correctness grid")
    ap.add_argument("--bench", action="store_true", help="ResNet-50 shape timings")
    ap.add_argument("--quick", action="store_true", help="smaller grids")
    ap.add_argument("--emulate", action="store_true",
                    help="run the kernel source on the CPU emulator (no GPU needed)")
    ap.add_argument("--backend", choices=["torch", "cupy"], default=None)
    ap.add_argument("--lib", default=None, help="path of the kernel library to load")
    ap.add_argument("--no-build", action="store_true", help="do not run make first")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--acts", nargs="+", default=list(ACTS), choices=list(ACTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="run only the first N check cases")
    ap.add_argument("--verbose", "-v", action="store_true", help="print passing cases too")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--bench-act", default="relu", choices=list(ACTS))
    ap.add_argument("--no-proxy", action="store_true", help="bench without proxy norm")
    ap.add_argument("--channels-first", action="store_true", help="bench NCHW")
    ap.add_argument("--chunk-bytes", type=int, default=0,
                    help="tfpn_problem.chunk_bytes for --bench (0 auto, -1 no chunking)")
    args = ap.parse_args(argv)
    if not (args.check or args.bench):
        args.check = True

    if args.emulate:
        lib_path = args.lib or os.path.join(HERE, "build", "libtfpn_emu.so")
        if not args.no_build:
            build("emu")
        backend = EmuBackend()
    else:
        lib_path = args.lib or os.path.join(HERE, "build", "libtfpn_cuda.so")
        backend = CupyBackend() if args.backend == "cupy" else TorchBackend()
        if not args.no_build:
            build("lib")
    lib = load_library(lib_path)
    rt, drv = ctypes.c_int(), ctypes.c_int()
    rc = lib.tfpn_cuda_check(ctypes.byref(rt), ctypes.byref(drv))
    print(f"library {lib_path}; backend {backend.name}; CUDA runtime {rt.value}, "
          f"driver {drv.value}")
    if rc != 0:
        print("tfpn_cuda_check failed:", lib.tfpn_last_error().decode())
        return 2
    runner = Runner(lib, backend)
    status = 0
    if args.check:
        status |= cmd_check(runner, args)
    if args.bench:
        status |= cmd_bench(runner, args)
    return status


if __name__ == "__main__":
    sys.exit(main())
