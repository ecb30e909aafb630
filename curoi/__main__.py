"""`python3 -m curoi` runs the demo; `python3 -m curoi build` builds the CPU
library into the cache ahead of time; `python3 -m curoi bench --help` the
benchmark; `python3 -m curoi check --help` the GPU verification."""

import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        from ._bench import main as bench

        return bench(argv[1:])
    if argv and argv[0] == "build" and len(argv) == 1:
        from . import _cpu

        _cpu.library()
        print(_cpu.library_path())
        return 0
    if argv and argv[0] == "check":
        from ._check import main as check

        return check(argv[1:])
    if argv:
        print("usage: python3 -m curoi            run the demo\n"
              "       python3 -m curoi build      build the CPU library into "
              "the cache ahead of time\n"
              "       python3 -m curoi bench ...  time curoi against its peers "
              "(--help for options)\n"
              "       python3 -m curoi check --device cuda --out DIR\n"
              "                                   the whole GPU verification "
              "(--help for options)", file=sys.stderr)
        return 0 if argv[0] in ("-h", "--help") else 2
    from ._demo import main as demo

    demo()
    return 0


sys.exit(main())
