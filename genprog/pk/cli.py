"""Command line: ``python -m genprog.pk`` (or ``genprog-pk``).

``fit`` reads a NONMEM-style CSV file, fits a population model and writes the results::

    python -m genprog.pk fit theo_sd.csv --structure one --absorption first_order \\
        --iiv ka,cl,v --error combined --covariate cl=WT --method mle --out results/

prints the data summary (:func:`genprog.pk.describe`), the parameter table and, for
``--method mle``, -2LL/OFV/AIC/BIC, and writes into ``--out``: ``summary.csv``,
``individual.csv`` (individual parameters: at the EBEs, with the etas, for ``mle``;
posterior means for ``vi``/``nuts``), ``residuals.csv``, ``gof.png``; for ``mle`` also
``vpc.png``; for ``vi``/``nuts`` ``posterior.nc`` (ArviZ netCDF, :func:`genprog.load`).

``describe`` prints the data summary only. Problems with the input (a malformed file, a
parameter the structure lacks, a covariate the file lacks) are one ``error: ...`` line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

STRUCTURES = {"one": "OneCompartment", "two": "TwoCompartment", "three": "ThreeCompartment"}
ABSORPTIONS = ("first_order", "iv", "zero_order")
ERRORS = ("additive", "proportional", "combined", "exponential")
METHODS = ("mle", "vi", "nuts")


class UsageError(Exception):
    """A problem with the command's input, reported as ``error: ...`` (exit status 2)."""


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m genprog.pk",
                                description="Population PK on NONMEM-style data (genprog.pk).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("describe", help="summarise a NONMEM-style data file")
    d.add_argument("data", help="CSV file (NONMEM conventions)")
    d.add_argument("--lloq", type=float, default=None, help="limit of quantification")

    f = sub.add_parser("fit", help="fit a population model and write summaries and plots",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    f.add_argument("data", help="CSV file (NONMEM conventions)")
    f.add_argument("--structure", choices=list(STRUCTURES), default="one",
                   help="number of disposition compartments")
    f.add_argument("--absorption", choices=ABSORPTIONS, default="first_order")
    f.add_argument("--iiv", default=None,
                   help="comma-separated parameters with IIV, or 'none' "
                        "(default: cl, the central volume and ka if absorbed first-order)")
    f.add_argument("--omega", choices=("diagonal", "block"), default="diagonal")
    f.add_argument("--error", choices=ERRORS, default="combined")
    f.add_argument("--covariate", action="append", default=[], metavar="PARAM=COV[:KIND]",
                   help="covariate effect, e.g. cl=WT or cl=WT:allometric (kinds: power, "
                        "allometric, linear, categorical); repeat or separate with commas")
    f.add_argument("--dvid", default=None, help="observation type to model (DVID name)")
    f.add_argument("--lloq", type=float, default=None, help="limit of quantification")
    f.add_argument("--method", choices=METHODS, default="mle")
    f.add_argument("--chains", type=_count(1), default=4, help="NUTS chains")
    f.add_argument("--warmup", type=_count(0), default=500, help="NUTS warmup iterations")
    f.add_argument("--draws", type=_count(1), default=500, help="draws kept (NUTS per chain; VI)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--n-sim", type=_count(1), default=200, dest="n_sim", help="VPC replicates")
    f.add_argument("--out", required=True, help="output folder (created if needed)")
    return p


def _covariates(specs) -> dict:
    effects: dict = {}
    for spec in specs:
        for one in filter(None, (s.strip() for s in spec.split(","))):
            param, eq, cov = one.partition("=")
            if not eq or not param.strip() or not cov.strip():
                raise UsageError(f"--covariate: expected PARAM=COV[:KIND], got {one!r}")
            name, _, kind = cov.partition(":")
            effects.setdefault(param.strip().lower(), []).append(
                (name.strip(), kind.strip() or "power"))
    return effects


def _model(args, data):
    from . import PopulationModel, structural

    structure = getattr(structural, STRUCTURES[args.structure])(absorption=args.absorption)
    params = structure.parameters
    if args.iiv is None:
        iiv = [p for p in ("cl", "v", "v1", "ka") if p in params]
    elif args.iiv.strip().lower() == "none":
        iiv = []
    else:
        iiv = [p.strip().lower() for p in args.iiv.split(",") if p.strip()]
    dvid = args.dvid
    if dvid is not None and dvid not in data.dvid_names:
        raise UsageError(f"--dvid: no observation type {dvid!r} in the data "
                         f"(it has {data.dvid_names})")
    model = PopulationModel(structure=structure, random_effects=iiv, error=args.error,
                            covariates=_covariates(args.covariate), omega=args.omega, dvid=dvid)
    model.check_data(data)
    return model


def _fit(args, model, data):
    if args.method == "mle":
        return model.fit(data, "mle", seed=args.seed)
    if args.method == "vi":
        return model.fit(data, "vi", draws=args.draws, seed=args.seed)
    return model.fit(data, "nuts", chains=args.chains, warmup=args.warmup, draws=args.draws,
                     seed=args.seed)


def _report_warnings(caught, err) -> None:
    for w in caught:
        if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
            continue
        print(f"warning: {w.message}", file=err)


def _read(args):
    from .data import read_nonmem

    return read_nonmem(args.data, lloq=args.lloq)


def _describe(data) -> str:
    from .data import describe

    return describe(data)


def _run_fit(args, model, data, outdir, out, err) -> int:
    import pandas as pd

    from .diagnostics import plot_gof, residuals, vpc

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = _fit(args, model, data)
    _report_warnings(caught, err)
    table = fit.summary()
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(f"\n{model.structure} | IIV {list(model.random_effects)} | {model.error} error | "
              f"method {args.method}", file=out)
        print(table.to_string(float_format=lambda x: f"{x:.4g}"), file=out)
    table.to_csv(outdir / "summary.csv", float_format="%.8g")
    written = ["summary.csv"]
    if args.method == "mle":
        print(f"\n-2LL {fit.minus2ll:.3f}   OFV {fit.ofv:.3f}   AIC {fit.aic:.3f}   "
              f"BIC {fit.bic:.3f}   (n_obs {fit.n_obs}, n_params {fit.n_params}, "
              f"converged {fit.converged})", file=out)
    elif "elpd_loo" in table.attrs:
        print(f"\nelpd_loo {table.attrs['elpd_loo']:.3f} (se {table.attrs['elpd_loo_se']:.3f}, "
              f"p_loo {table.attrs['p_loo']:.2f})", file=out)
    individual = fit.individual_parameters()
    if args.method == "mle":
        for j, p in enumerate(model.random_effects):
            individual[f"eta_{p}"] = fit.eta[:, j].cpu().numpy()
    individual.to_csv(outdir / "individual.csv", float_format="%.8g")
    written.append("individual.csv")
    residuals(fit).to_csv(outdir / "residuals.csv", index=False, float_format="%.8g")
    written.append("residuals.csv")
    plot_gof(fit).savefig(outdir / "gof.png", dpi=110)
    written.append("gof.png")
    if args.method == "mle":
        vpc(fit, n_sim=args.n_sim, seed=args.seed).savefig(outdir / "vpc.png", dpi=110)
        written.append("vpc.png")
    else:
        fit.save(outdir / "posterior.nc")
        written.append("posterior.nc")
    print(f"\nwrote {', '.join(written)} to {outdir}", file=out)
    return 0


def main(argv=None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit
    status: 0 success, 2 bad input (one ``error: ...`` line on stderr; argparse's own
    usage errors exit 2 as well)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, or argparse's usage error (already printed)
        return e.code if isinstance(e.code, int) else 2
    out, err = sys.stdout, sys.stderr
    try:
        data = _read(args)
        if args.command == "describe":
            print(_describe(data), file=out)
            return 0
        print(_describe(data), file=out)
        model = _model(args, data)
        outdir = Path(args.out)
        outdir.mkdir(parents=True, exist_ok=True)
    except (UsageError, ValueError, TypeError, OSError) as e:
        print(f"error: {_message(e)}", file=err)
        return 2
    return _run_fit(args, model, data, outdir, out, err)


def _message(e: Exception) -> str:
    if isinstance(e, OSError) and e.filename:
        return f"{e.strerror or type(e).__name__}: {e.filename}"
    return str(e) or type(e).__name__
