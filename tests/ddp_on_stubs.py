"""examples/ddp_train.py on the CPU with the float64 reference stubs in place of the GPU glue, as
a script that torchrun can start (tests/test_ddp_train.py runs it on 2 processes)."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]

from test_nsa_layer import stub_modules  # noqa: E402

for _mod in stub_modules():
    sys.modules[_mod.__name__] = _mod

import ddp_train  # noqa: E402

if __name__ == "__main__":
    sys.exit(ddp_train.main(sys.argv[1:]))
