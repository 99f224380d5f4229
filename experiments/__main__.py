import sys

from .cli import main

try:
    code = main()
except ValueError as e:   # kernels.ir.ops.OperatorError: a $SCHEDGYM_OPERATORS file that does not load
    if type(e).__name__ != "OperatorError":
        raise
    print(f"error: {e}", file=sys.stderr)
    code = 2
sys.exit(code)
