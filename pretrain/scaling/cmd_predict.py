"""`danlu predict FIT.json`: loss at (N, D), or the compute-optimal N, D and loss at a budget, with intervals."""
from __future__ import annotations

import argparse
import json

from pretrain.scaling import exits_2_on_fit_errors


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("fit", help="fit.json of `danlu fit` (or its directory)")
    p.add_argument("--params", type=float, help="model size N (in the count the fit used)")
    p.add_argument("--tokens", type=float, help="training tokens D")
    p.add_argument("--flops", type=float, help="compute budget C (FLOPs in the fit's convention, 6ND by default): "
                                               "the compute-optimal N, D and best loss")


@exits_2_on_fit_errors
def main(args: argparse.Namespace) -> int:
    from pretrain.scaling.predict import load_fit, predict

    out = predict(load_fit(args.fit), params=args.params, tokens=args.tokens, flops=args.flops)
    ci = lambda k: f" [{out[k + '_ci'][0]:.4g}, {out[k + '_ci'][1]:.4g}]" if k + "_ci" in out else ""  # noqa: E731
    if args.flops is not None:
        print(f"C={out['C']:.4g}: N_opt {out['N_opt']:.4g}{ci('N_opt')}, D_opt {out['D_opt']:.4g}{ci('D_opt')}, "
              f"loss {out['loss']:.4f}{ci('loss')} ({out['estimator']}, the default)")
        for name in ("frontier", "gpt4", "approach3"):
            if name in out and name != out["estimator"]:
                e = out[name]
                iv = f" [{e['loss_ci'][0]:.4g}, {e['loss_ci'][1]:.4g}]" if "loss_ci" in e else ""
                print(f"  {name}: loss {e['loss']:.4f}{iv}")
    else:
        print(f"N={out['N']:.4g} D={out['D']:.4g} (C={out['C_6nd']:.4g}): loss {out['loss']:.4f}{ci('loss')} "
              f"({out['estimator']}: {out['why']})")
    print(json.dumps(out))
    return 0
