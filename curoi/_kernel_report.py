"""What the GPU kernels cost, read from the compiler without a GPU.

Two facts decide whether a RoI kernel runs well on every NVIDIA GPU, and
both can be read from NVRTC's output on a machine without one:

- float64 arithmetic: consumer GPUs run it at 1/32 to 1/64 of the float32
  rate, so the float32/float16/bfloat16 kernels must not contain any;
- register spills: a kernel that needs more registers than the hardware
  gives it moves values to local memory, a round trip to the cache.

For each kernel family, element type and architecture this module compiles
exactly what the GPU backend compiles (``curoi._gpu.module_source(family)``
with ``curoi._gpu.compile_options(dtype)``), for a real architecture and
with ``-Xptxas -v``, so that one NVRTC call gives both the PTX and ptxas's
per-function report (registers, stack frame, spill bytes) in the program
log. Needs only NVRTC (``cupy_backends.cuda.libs.nvrtc``), not nvcc or
ptxas.
"""

import concurrent.futures
import dataclasses
import functools
import re

from . import _cpu, _gpu, _kernels, _sources

def _archs():
    """The oldest architecture this NVRTC builds curoi for (sm_70 with CUDA
    12, sm_75 with CUDA 13; see curoi._gpu.MINIMUM_ARCH), the first with
    native bfloat16, and the generation of current data-centre GPUs."""
    try:
        from cupy_backends.cuda.libs import nvrtc

        major = nvrtc.getVersion()[0]
    except Exception:  # no NVRTC: nothing is compiled; name CUDA 12's
        major = 12
    return _gpu.checked_archs(major)


ARCHS = _archs()
DTYPES = tuple(_kernels.SUFFIXES)


class KernelReportError(RuntimeError):
    """NVRTC is missing, or it failed or reported nothing usable."""


@dataclasses.dataclass(frozen=True)
class KernelStats:
    """One kernel entry compiled for one architecture.

    ``f64_instructions`` and ``f64_divisions`` are counted as
    :func:`count_f64_instructions` says; registers, spills and stack come
    from ptxas (``None`` when its report lacks the entry). Spills and stack
    include those of the device functions the entry calls, if any were
    left out of line.
    """

    kernel: str
    dtype: str
    arch: str
    f64_instructions: int
    f64_divisions: int
    registers: "int | None"
    spill_store_bytes: "int | None"
    spill_load_bytes: "int | None"
    stack_bytes: "int | None"

    @property
    def spill_bytes(self):
        if self.spill_store_bytes is None or self.spill_load_bytes is None:
            return None
        return self.spill_store_bytes + self.spill_load_bytes


def nvrtc_module():
    """CuPy's NVRTC binding, or raise KernelReportError saying what is missing."""
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as error:
        raise KernelReportError(
            "the kernel report compiles with NVRTC through CuPy, which is not "
            "importable here; install curoi with `pip install -e \".[cuda12]\"` "
            f"(or \".[cuda13]\") in its folder: {error}"
        ) from error
    try:
        nvrtc.getVersion()
    except Exception as error:
        raise KernelReportError(
            f"CuPy is installed but its NVRTC library cannot be loaded: {error}"
        ) from error
    return nvrtc


def nvrtc_version():
    return "%d.%d" % nvrtc_module().getVersion()


@dataclasses.dataclass(frozen=True)
class Compiled:
    cubin: bytes
    ptx: str
    log: str


def compile_source(source, name, options, arch):
    """Compile ``source`` for ``arch`` (``"sm_80"``) with ptxas's verbose
    report; raise KernelReportError with NVRTC's log when it fails."""
    nvrtc = nvrtc_module()
    options = list(options) + [f"--gpu-architecture={arch}", "-Xptxas", "-v"]
    program = nvrtc.createProgram(source, name, [], [])
    try:
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as error:
            raise KernelReportError(
                f"NVRTC failed on {name} for {arch} ({error}) with options "
                f"{options}:\n{nvrtc.getProgramLog(program)}"
            ) from error
        ptx = nvrtc.getPTX(program)
        return Compiled(
            cubin=nvrtc.getCUBIN(program),
            ptx=ptx.decode() if isinstance(ptx, bytes) else ptx,
            log=nvrtc.getProgramLog(program),
        )
    finally:
        nvrtc.destroyProgram(program)


@functools.lru_cache(maxsize=None)
def compile_module(family, dtype, arch):
    """One GPU module as the backend builds it, compiled once per process."""
    return compile_source(_gpu.module_source(family), f"{family}.cu",
                          _gpu.compile_options(dtype), arch)


# A function header: ".visible .entry name(" or ".func (.param .b64 r) name(".
_HEADER = re.compile(
    r"^[ \t]*(?:\.(?:visible|weak|extern)[ \t]+)*\.(entry|func)[ \t]+"
    r"(?:\([^)]*\)[ \t]*)?([\w$]+)",
    re.MULTILINE,
)
_LABELS = re.compile(r"^(?:[\w$]+:\s*)+")
_PREDICATE = re.compile(r"^@!?%?[\w$]+\s+")
_CALLEE = re.compile(r"^\s*(?:\([^)]*\)\s*,\s*)?([\w$]+)")


def _functions(ptx):
    """{name: (is_entry, body text)} of every function defined in the PTX."""
    ptx = re.sub(r"//[^\n]*", "", ptx)
    ptx = re.sub(r"/\*.*?\*/", "", ptx, flags=re.DOTALL)
    found = {}
    for match in _HEADER.finditer(ptx):
        # Past the parameter list, the first "{" opens a body and a ";"
        # ends a mere declaration (.extern .func).
        position, depth = match.end(), 0
        while position < len(ptx):
            char = ptx[position]
            if char == "(":
                depth += 1
            elif char == ")":
                depth -= 1
            elif depth == 0 and char in "{;":
                break
            position += 1
        if position >= len(ptx) or ptx[position] == ";":
            continue
        start, depth = position, 0
        while position < len(ptx):
            if ptx[position] == "{":
                depth += 1
            elif ptx[position] == "}":
                depth -= 1
                if depth == 0:
                    break
            position += 1
        found[match.group(2)] = (match.group(1) == "entry", ptx[start + 1:position])
    return found


def _instructions(body):
    """The instructions of a function body: (opcode, operands) pairs, with
    labels, predicate guards, scope braces and directives (.reg, .local,
    .pragma ...) left out. Statements may span lines; ";" ends each."""
    body = body.replace("{", " ").replace("}", " ")
    for statement in body.split(";"):
        statement = _LABELS.sub("", statement.strip())
        statement = _PREDICATE.sub("", statement)
        if not statement or statement.startswith("."):
            continue
        opcode, *operands = statement.split(None, 1)
        yield opcode, operands[0] if operands else ""


def count_f64_instructions(ptx):
    """Per ``.entry`` of a PTX text: ``{name: (f64 instructions, f64 divisions)}``.

    An instruction counts as float64 when ``f64`` is one of the dot-separated
    parts of its opcode: arithmetic (``add.f64``, ``fma.rn.f64``,
    ``div.rn.f64``), comparisons and selections (``setp.lt.f64``,
    ``selp.f64``), moves, loads and stores of doubles (``mov.f64``,
    ``ld.global.f64``) and every conversion to or from double
    (``cvt.f64.f32``, ``cvt.rn.f32.f64``, ``cvt.rzi.s64.f64``). Directives
    (``.reg .f64``, ``.param .f64``) are declarations, not instructions, and
    do not count. ``f64_divisions`` counts ``div.*.f64`` and ``rcp.*.f64``
    among them. A device function called from the entry (``call``) adds its
    own count once per entry, transitively; NVRTC usually inlines all of
    them.
    """
    functions = _functions(ptx)
    own, calls = {}, {}
    for name, (_, body) in functions.items():
        total = divisions = 0
        callees = set()
        for opcode, operands in _instructions(body):
            parts = opcode.split(".")
            if "f64" in parts[1:]:
                total += 1
                if parts[0] in ("div", "rcp"):
                    divisions += 1
            if parts[0] == "call":
                callee = _CALLEE.match(operands)
                if callee:
                    callees.add(callee.group(1))
        own[name] = (total, divisions)
        calls[name] = callees
    return {
        name: tuple(sum(own[f][i] for f in _reachable(name, calls) if f in own)
                    for i in (0, 1))
        for name, (is_entry, _) in functions.items() if is_entry
    }


def _reachable(name, calls):
    seen, stack = set(), [name]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(calls.get(current, ()))
    return seen


def ptx_call_graph(ptx):
    """{function: set of functions it calls, transitively, itself included}."""
    calls = {}
    for name, (_, body) in _functions(ptx).items():
        calls[name] = {
            match.group(1)
            for opcode, operands in _instructions(body)
            if opcode.split(".")[0] == "call"
            for match in [_CALLEE.match(operands)] if match
        }
    return {name: _reachable(name, calls) for name in calls}


_PROPERTIES = re.compile(r"Function properties for ([\w$]+)")
_FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_ENTRY = re.compile(r"Compiling entry function '([\w$]+)'")
_REGISTERS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log):
    """ptxas's verbose report -> ``{function: {"registers", "stack",
    "spill_stores", "spill_loads"}}`` (registers only for entries)."""
    found = {}
    entry = described = None
    for line in log.splitlines():
        match = _ENTRY.search(line)
        if match:
            entry = match.group(1)
            found.setdefault(entry, {})
            continue
        match = _PROPERTIES.search(line)
        if match:
            described = match.group(1)
            found.setdefault(described, {})
            continue
        match = _FRAME.search(line)
        if match and described is not None:
            stack, stores, loads = (int(g) for g in match.groups())
            found[described].update(stack=stack, spill_stores=stores,
                                    spill_loads=loads)
            described = None
            continue
        match = _REGISTERS.search(line)
        if match and entry is not None:
            found[entry]["registers"] = int(match.group(1))
    return found


def analyse(compiled, dtype, arch):
    """KernelStats for every entry of one compiled module, in PTX order."""
    f64 = count_f64_instructions(compiled.ptx)
    graph = ptx_call_graph(compiled.ptx)
    ptxas = parse_ptxas_log(compiled.log)
    rows = []
    for name, (total, divisions) in f64.items():
        parts = [ptxas.get(f, {}) for f in graph.get(name, {name})]

        def summed(key, parts=parts):
            values = [p.get(key) for p in parts if p]
            if not values or any(v is None for v in values):
                return None
            return sum(values)

        rows.append(KernelStats(
            kernel=name, dtype=dtype, arch=arch,
            f64_instructions=total, f64_divisions=divisions,
            registers=ptxas.get(name, {}).get("registers"),
            spill_store_bytes=summed("spill_stores"),
            spill_load_bytes=summed("spill_loads"),
            stack_bytes=summed("stack"),
        ))
    return rows


def module_report(family, dtype, arch):
    """KernelStats of every kernel of one family, dtype and architecture."""
    return analyse(compile_module(family, dtype, arch), dtype, arch)


def report(families=_sources.FAMILIES, dtypes=DTYPES, archs=ARCHS, progress=None):
    """KernelStats for every kernel x dtype x architecture. ``progress``, if
    given, is called with (done, total) after each module compiles."""
    cases = [(f, d, a) for f in families for d in dtypes for a in archs]
    rows = []
    # NVRTC releases the GIL while it compiles: one module per core at once.
    with concurrent.futures.ThreadPoolExecutor(_cpu._available_cores()) as pool:
        compiled = pool.map(lambda case: compile_module(*case), cases)
        for done, ((family, dtype, arch), _) in enumerate(zip(cases, compiled), 1):
            rows += module_report(family, dtype, arch)
            if progress is not None:
                progress(done, len(cases))
    return rows


def format_table(rows):
    """A Markdown table of KernelStats, one row per kernel, dtype and arch."""
    header = ("kernel", "arch", "f64 instr", "f64 div", "registers",
              "spill st/ld B", "stack B")

    def shown(value):
        return "?" if value is None else str(value)

    lines = [
        (row.kernel, row.arch, str(row.f64_instructions), str(row.f64_divisions),
         shown(row.registers),
         f"{shown(row.spill_store_bytes)}/{shown(row.spill_load_bytes)}",
         shown(row.stack_bytes))
        for row in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(header)]

    def format_line(cells):
        return "| " + " | ".join(
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths))) + " |"

    out = [format_line(header),
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [format_line(line) for line in lines]
    return "\n".join(out)
