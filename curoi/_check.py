"""`python3 -m curoi check --device cuda --out DIR`: the whole GPU
verification as one command, for a machine with a CUDA device and minutes
to spare.

Steps, in order (each with its own time limit; a step that would start after
the deadline is skipped, and the summary is rewritten after every step, so
that a run cut short still leaves what it found):

1. ``environment``: curoi's backend report, the packages that matter
   (CuPy, PyTorch, torchvision, JAX, TensorFlow, onnxruntime), the devices;
2. ``compile``: every kernel module (family x dtype) compiled by NVRTC at
   once, on all cores, into the CuPy cache of this run (``DIR/cupy-cache``,
   which the later steps reuse);
3. ``tests``: ``pytest -m cuda`` over the test suite: tests/test_gpu.py,
   tests/test_gpu_integration.py (the caller's allocator, CUDA graph capture
   and replay through PyTorch, several streams, a non-current device where
   there are two, TensorFlow and JAX on GPU arrays) and the CUDA tests of the
   torch, JAX and TensorFlow suites;
4. ``memcheck`` and ``racecheck``: compute-sanitizer on a small call of every
   operator, forward and backward (plain and deterministic) and box
   gradients, in two dtypes and both layouts, with hostile boxes (this
   module's ``--sanitizer-target``);
5. ``bench``: ``python3 -m curoi bench --device cuda`` for W1, W2 and FPN,
   float32 and float16, against torchvision's CUDA kernels in the same run.

Writes ``DIR/check.log`` (every step's output), ``DIR/summary.json`` (the
plan, each step's status, time and key figures) and the steps' own files
(``pytest.xml``, ``bench.json``, ``bench.md``, the sanitizers' logs).
``--dry-run`` writes the plan and the summary without running anything;
``--steps`` picks steps by name. Needs a source checkout for the tests (run
from its root); installs nothing.
"""

import argparse
import concurrent.futures
import dataclasses
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

#: Total time the check may take, and each step's own limit (seconds).
DEADLINE = 8 * 60
LIMITS = {"environment": 60, "compile": 150, "tests": 240, "memcheck": 120,
          "racecheck": 90, "bench": 150}
STEPS = tuple(LIMITS)
#: The bench's workloads and repeats on a GPU.
BENCH_WORKLOADS = "W1,W2,FPN"
BENCH_REPEAT = 7


@dataclasses.dataclass
class Step:
    name: str
    command: list  # argv, or None for a step run in this process
    limit: float
    status: str = "planned"
    seconds: float = 0.0
    summary: dict = dataclasses.field(default_factory=dict)

    def record(self):
        return {"name": self.name,
                "command": None if self.command is None else shlex.join(self.command),
                "limit_s": self.limit, "status": self.status,
                "seconds": round(self.seconds, 1), "summary": self.summary}


def plan(out, python=sys.executable, tests="tests"):
    """The steps the check runs, with their commands, for output folder
    ``out``."""
    out = Path(out)
    target = [python, "-m", "curoi", "check", "--sanitizer-target"]
    sanitizer = shutil.which("compute-sanitizer") or "compute-sanitizer"
    commands = {
        "environment": None,
        "compile": None,
        "tests": [python, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
                  "-m", "cuda", f"--junitxml={out / 'pytest.xml'}", tests],
        "memcheck": [sanitizer, "--tool", "memcheck", "--error-exitcode", "1",
                     "--print-limit", "50", "--leak-check", "no",
                     "--log-file", str(out / "memcheck.log")] + target,
        "racecheck": [sanitizer, "--tool", "racecheck", "--error-exitcode", "1",
                      "--print-limit", "50", "--log-file", str(out / "racecheck.log")]
        + target,
        "bench": [python, "-m", "curoi", "bench", "--device", "cuda", "--workload",
                  BENCH_WORKLOADS, "--repeat", str(BENCH_REPEAT),
                  "--json", str(out / "bench.json")],
    }
    return [Step(name, commands[name], LIMITS[name]) for name in STEPS]


# --------------------------------------------------------------- the steps
def _environment():
    import curoi

    info = curoi.backend_info()
    packages = {}
    for name in ("numpy", "cupy", "torch", "torchvision", "jax", "jaxlib",
                 "tensorflow", "onnxruntime", "ml_dtypes"):
        try:
            module = __import__(name)
        except Exception as error:  # absent, or broken: say which
            packages[name] = None if isinstance(error, ImportError) else repr(error)
            continue
        packages[name] = getattr(module, "__version__", "?")
    smi = shutil.which("nvidia-smi")
    devices = None
    if smi:
        done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
        devices = done.stdout.strip().splitlines()
    gpu = info.get("gpu", {})
    ok = bool(gpu.get("devices"))
    return ok, {"python": platform.python_version(), "packages": packages,
                "nvidia_smi": devices, "gpu": gpu}


def _compile_all():
    """Every module the GPU backend may load, compiled at once (NVRTC
    releases the GIL), so that the later steps find them in CuPy's cache."""
    from . import _gpu, _kernels, _sources

    cupy = _gpu.require_cupy()
    device = cupy.cuda.Device().id
    cases = [(family, dtype) for family in _sources.FAMILIES
             for dtype in _kernels.SUFFIXES]
    failures = {}

    def build(case):
        family, dtype = case
        try:
            _gpu._module(cupy, device, family, dtype)
        except Exception as error:
            failures[f"{family} {dtype}"] = str(error).splitlines()[:20]

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        list(pool.map(build, cases))
    return not failures, {"modules": len(cases), "failed": failures}


def _pytest_summary(path):
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {key: sum(int(s.get(key, 0)) for s in suites)
              for key in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        for child in case:
            if child.tag in ("failure", "error"):
                failed.append(f"{case.get('classname')}::{case.get('name')}: "
                              + (child.get("message") or "")[:300])
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] \
        - counts["skipped"]
    counts["failed_tests"] = failed[:50]
    return counts


def _sanitizer_summary(path):
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return {}
    lines = text.strip().splitlines()
    found = [line for line in lines if "ERROR SUMMARY" in line or "RACECHECK SUMMARY"
             in line]
    return {"summary": found[-1] if found else None, "tail": lines[-15:]}


def _bench_summary(path):
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    rows = []
    for r in data.get("results", []):
        row = {"workload": r["workload"], "dtype": r["dtype"],
               "operation": r["operation"], "curoi_ms": r["curoi"]}
        for peer, value in r.get("peers", {}).items():
            row[f"{peer}_ms"] = value
            if value and r["curoi"]:
                row[f"curoi/{peer}"] = round(r["curoi"] / value, 3)
        rows.append(row)
    return {"device": data.get("device"), "rows": rows}


# ------------------------------------------------------------- the runner
class Log:
    def __init__(self, path):
        self.handle = open(path, "a", encoding="utf-8")

    def write(self, text):
        self.handle.write(text)
        self.handle.flush()
        sys.stdout.write(text)
        sys.stdout.flush()


def _run_command(step, log, env, remaining):
    limit = min(step.limit, remaining)
    log.write(f"\n$ {shlex.join(step.command)}\n")
    try:
        done = subprocess.run(step.command, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env,
                              timeout=limit)
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout or ""
        log.write(output if isinstance(output, str) else output.decode(errors="replace"))
        return "timeout", None, output
    except FileNotFoundError as error:
        log.write(f"{error}\n")
        return "unavailable", None, ""
    log.write(done.stdout)
    return ("passed" if done.returncode == 0 else "failed"), done.returncode, done.stdout


def run(steps, out, deadline=DEADLINE, dry_run=False):
    """Run ``steps`` (from :func:`plan`), writing the log and the summary
    into ``out``; returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    started = time.monotonic()
    env = dict(os.environ)
    env["CUPY_CACHE_DIR"] = str(out / "cupy-cache")  # read at `import cupy`
    os.environ["CUPY_CACHE_DIR"] = env["CUPY_CACHE_DIR"]
    summary = {"curoi_check": 1, "device": "cuda", "out": str(out),
               "dry_run": dry_run, "deadline_s": deadline,
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "steps": []}

    def write():
        summary["steps"] = [s.record() for s in steps]
        summary["ok"] = all(s.status in ("passed", "planned") for s in steps)
        summary["seconds"] = round(time.monotonic() - started, 1)
        summary_path.write_text(json.dumps(summary, indent=1))

    write()
    if dry_run:
        return summary
    log = Log(out / "check.log")
    for step in steps:
        remaining = deadline - (time.monotonic() - started)
        if remaining < 10:
            step.status = "skipped"
            step.summary = {"reason": "the check's deadline came first"}
            write()
            continue
        log.write(f"\n==== {step.name} (limit {min(step.limit, remaining):.0f} s)\n")
        begin = time.monotonic()
        try:
            if step.name == "environment":
                ok, step.summary = _environment()
                log.write(json.dumps(step.summary, indent=1) + "\n")
                step.status = "passed" if ok else "failed"
                if not ok:
                    step.summary["reason"] = "CuPy sees no usable CUDA device"
            elif step.name == "compile":
                ok, step.summary = _compile_all()
                log.write(json.dumps(step.summary, indent=1) + "\n")
                step.status = "passed" if ok else "failed"
            else:
                step.status, code, output = _run_command(step, log, env, remaining)
                step.summary = {"returncode": code, "tail": output.splitlines()[-12:]}
                if step.name == "tests":
                    step.summary.update(_pytest_summary(out / "pytest.xml"))
                elif step.name in ("memcheck", "racecheck"):
                    step.summary.update(_sanitizer_summary(out / f"{step.name}.log"))
                elif step.name == "bench":
                    (out / "bench.md").write_text(output)
                    step.summary.update(_bench_summary(out / "bench.json"))
        except Exception as error:  # a step's own failure: record it, go on
            step.status = "failed"
            step.summary["error"] = f"{type(error).__name__}: {error}"
            log.write(f"{step.summary['error']}\n")
        step.seconds = time.monotonic() - begin
        write()
        if step.name == "environment" and step.status != "passed":
            for later in steps[1:]:
                later.status = "skipped"
                later.summary = {"reason": "no usable CUDA device"}
            write()
            break
    log.write(f"\nsummary: {summary_path}\n")
    return summary


# ---------------------------------------------------- the sanitizers' target
def sanitizer_target(xp):
    """A small call of every operator, forward, backward (plain and
    deterministic) and box gradient, float32 and half precision (float64 on
    the CPU), both layouts, on boxes inside the map and hostile ones (NaN,
    infinite, 1e9 pixels, reversed, empty, batch indices out of range or
    fractional). Returns the number of calls made."""
    import numpy as np

    import curoi

    rng = np.random.default_rng(0)
    n, c, h, w = 2, 4, 9, 11
    good = np.concatenate([rng.integers(0, n, (6, 1)),
                           np.sort(rng.uniform(-2, 13, (6, 2, 2)), axis=1).reshape(6, 4)
                           [:, [0, 2, 1, 3]]], axis=1)
    hostile = np.array([[0, np.nan, 1, 4, 4], [1, 0, 0, np.inf, 5], [0, -1e9, -1e9, 1e9, 1e9],
                        [1, 8, 8, 2, 2], [0, 3, 3, 3, 3], [-1, 1, 1, 5, 5], [n, 1, 1, 5, 5],
                        [1.7, 1, 1, 5, 5], [np.nan, 1, 1, 5, 5]])
    boxes = np.concatenate([good, hostile]).astype(np.float32)
    rotated = np.concatenate([boxes[:, :3], np.abs(boxes[:, 3:5] - boxes[:, 1:3]),
                              rng.uniform(-90, 90, (len(boxes), 1))], axis=1).astype(
                                  np.float32)
    crop_boxes = np.concatenate([rng.uniform(-0.2, 1.2, (6, 4)),
                                 [[np.nan, 0, 1, 1], [0, 0, np.inf, 1], [1, 1, 0, 0]]]
                                ).astype(np.float32)
    crop_indices = np.array([0, 1, 0, 1, 0, 1, -1, 2, 1], np.int32)
    dtypes = ["float32", "float16"] if xp is not np else ["float32", "float64"]
    calls = 0
    for dtype in dtypes:
        for data_format in ("NCHW", "NHWC"):
            shape = (n, c, h, w) if data_format == "NCHW" else (n, h, w, c)
            x = xp.asarray(rng.standard_normal(shape).astype(dtype))
            b, r = xp.asarray(boxes), xp.asarray(rotated)
            kw = dict(data_format=data_format)

            def grad_like(y):
                return xp.asarray(rng.standard_normal(y.shape).astype(y.dtype))

            for ratio in (2, 0):
                y = curoi.roi_align(x, b, 3, 1.0, ratio, True, **kw)
                g = grad_like(y)
                for det in (False, True):
                    curoi.roi_align_backward(g, b, shape, 3, 1.0, ratio, True,
                                             deterministic=det, **kw)
                curoi.roi_align_boxes_backward(g, x, b, 3, 1.0, ratio, True, **kw)
                y, arg = curoi.roi_align(x, b, 3, 1.0, ratio, True, mode="max",
                                         return_argmax=True, **kw)
                curoi.roi_align_backward(g, b, shape, 3, 1.0, ratio, True, mode="max",
                                         argmax=arg, deterministic=True, **kw)
                calls += 7
            for convention in ("torchvision", "mmcv"):
                y, arg = curoi.roi_pool(x, b, 3, 1.0, convention=convention,
                                        return_argmax=True, **kw)
                for det in (False, True):
                    curoi.roi_pool_backward(grad_like(y), arg, b, shape,
                                            deterministic=det, **kw)
                y, arg = curoi.roi_spp(x, b, (1, 2), 1.0, convention=convention,
                                       return_argmax=True, data_format=data_format)
                curoi.roi_spp_backward(grad_like(y), b, shape, (1, 2), 1.0,
                                       convention=convention, argmax=arg,
                                       deterministic=True, data_format=data_format)
                calls += 5
            y = curoi.roi_spp(x, None, (1, 3), mode="avg", data_format=data_format)
            curoi.roi_spp_backward(grad_like(y), None, shape, (1, 3), mode="avg",
                                   data_format=data_format)
            ps = xp.asarray(rng.standard_normal(
                (n, 8, h, w) if data_format == "NCHW" else (n, h, w, 8)).astype(dtype))
            ps_shape = tuple(ps.shape)
            for name in ("ps_roi_pool", "ps_roi_align"):
                y = getattr(curoi, name)(ps, b, 2, 1.0, **kw)
                for det in (False, True):
                    getattr(curoi, name + "_backward")(grad_like(y), b, ps_shape, 2, 1.0,
                                                       deterministic=det, **kw)
            y = curoi.roi_align_rotated(x, r, 3, 1.0, 0, **kw)
            g = grad_like(y)
            curoi.roi_align_rotated_backward(g, r, shape, 3, 1.0, 0, deterministic=True,
                                             **kw)
            curoi.roi_align_rotated_boxes_backward(g, x, r, 3, 1.0, 0, **kw)
            y = curoi.prroi_pool(x, b, 3, 1.0, **kw)
            g = grad_like(y)
            curoi.prroi_pool_backward(g, b, shape, 3, 1.0, deterministic=True, **kw)
            curoi.prroi_pool_boxes_backward(g, x, b, 3, 1.0, **kw)
            crop_format = "NHWC" if data_format == "NHWC" else "NCHW"
            y = curoi.crop_and_resize(x, xp.asarray(crop_boxes), xp.asarray(crop_indices),
                                      (3, 4), data_format=crop_format)
            curoi.crop_and_resize_backward(grad_like(y), x, xp.asarray(crop_boxes),
                                           xp.asarray(crop_indices), (3, 4),
                                           deterministic=True, data_format=crop_format)
            levels = [xp.asarray(rng.standard_normal(
                (n, c, 16 >> i, 20 >> i) if data_format == "NCHW"
                else (n, 16 >> i, 20 >> i, c)).astype(dtype)) for i in range(3)]
            scales = [1 / 2, 1 / 4, 1 / 8]
            y = curoi.multiscale_roi_align(levels, b * 2, 3, scales, 2, **kw)
            curoi.multiscale_roi_align_backward(
                grad_like(y), b * 2, [tuple(v.shape) for v in levels], 3, scales, 2,
                deterministic=True, **kw)
            calls += 17
    if xp is not np:
        xp.cuda.Device().synchronize()
    return calls


# -------------------------------------------------------------------- main
def parser():
    p = argparse.ArgumentParser(
        prog="python3 -m curoi check", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--device", choices=("cuda",), default="cuda",
                   help="the device to check (only cuda: the CPU backend is the "
                        "test suite's)")
    p.add_argument("--out", metavar="DIR", help="folder for the log, the summary and "
                   "the steps' files (created; required)")
    p.add_argument("--steps", type=_steps, default=list(STEPS), metavar="NAME[,NAME]",
                   help=f"only these steps, of {', '.join(STEPS)} (default: all)")
    p.add_argument("--deadline", type=float, default=DEADLINE, metavar="SECONDS",
                   help=f"skip the steps that would start after this (default {DEADLINE})")
    p.add_argument("--dry-run", action="store_true",
                   help="write the plan and the summary, run nothing")
    p.add_argument("--sanitizer-target", action="store_true", help=argparse.SUPPRESS)
    return p


def _steps(text):
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STEPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown step {unknown[0] if unknown else text!r}; the steps are "
            f"{', '.join(STEPS)}")
    return names


def main(argv=None):
    args = parser().parse_args(argv)
    if args.sanitizer_target:
        from . import _gpu

        cupy = _gpu.require_cupy()
        # Every buffer its own cudaMalloc: memcheck then sees an access past
        # any array's end, which a memory pool's larger blocks would hide.
        cupy.cuda.set_allocator(None)
        print(f"{sanitizer_target(cupy)} calls", flush=True)
        return 0
    if not args.out:
        parser().error("--out DIR is required: the folder for the log and summary")
    if args.deadline <= 0:
        parser().error(f"--deadline: expected a positive number of seconds, got "
                       f"{args.deadline}")
    tests = "tests"
    if "tests" in args.steps and not Path(tests, "test_gpu.py").is_file():
        parser().error("the tests step needs a source checkout: run from the "
                       "repository's root (tests/test_gpu.py was not found)")
    steps = [s for s in plan(args.out, tests=tests) if s.name in args.steps]
    for step in steps:
        line = step.name if step.command is None else shlex.join(step.command)
        print(f"plan: {line}")
    summary = run(steps, args.out, args.deadline, args.dry_run)
    return 0 if summary["ok"] else 1
