"""The benchmark moved to `python3 -m curoi bench` (see its --help); this
script runs it with the workloads it used to measure: the Faster R-CNN box
head (W1) and the pathological boxes (stress). Arguments pass through."""

import sys

from curoi._bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["--workload", "W1,stress"]))
