"""Scaling laws: sweeps of small runs (plan, runner), fitted laws (fit), predictions (predict),
loss-curve fits of single runs (curve) and plots (plots)."""

import functools
import sys
from typing import Callable


def exits_2_on_fit_errors(run: Callable) -> Callable:
    """For the `main(args)` of the scaling commands: a FitError or CurveError (bad CSV, unusable run
    directory, too few runs) is printed as `danlu CMD: message` and the command exits 2."""

    @functools.wraps(run)
    def main(args) -> int:
        from pretrain.scaling.curve import CurveError
        from pretrain.scaling.fit import FitError

        try:
            return run(args)
        except (FitError, CurveError) as e:
            print(f"danlu {args.command}: {e}", file=sys.stderr)
            return 2

    return main
