"""Command line: ``genprog`` (also ``genprog-pk`` and ``python -m genprog.pk``).

``fit`` reads a NONMEM-style CSV file, fits a population model and writes the results::

    genprog fit theo_sd.csv --structure 1cmt-oral --iiv ka,cl,v --error combined \\
        --covariate cl=WT --method mle --out results/

``--structure`` is ``one``/``two``/``three`` (with ``--absorption``) or the short form
``{1,2,3}cmt-{oral,iv,infusion,zero-order}``. Without a data file (``genprog fit``) the
bundled theophylline example (``pk.dataset_path("theo_sd")``) is fitted.

It prints the data summary (:func:`genprog.pk.describe`), the parameter table and, for
``--method mle``, -2LL/OFV/AIC/BIC, and writes into ``--out`` (default ``genprog-fit``):
``summary.csv``, ``individual.csv`` (individual parameters: at the EBEs, with the etas,
for ``mle``; posterior means for ``vi``/``nuts``), ``residuals.csv`` (with NPDE),
``gof.png``, ``vpc.png``, ``npde.png``, ``individual.png`` (the first ``--individual``
subjects); for ``vi``/``nuts`` also ``posterior.nc`` (ArviZ InferenceData as netCDF,
:func:`genprog.load`). ``vi`` and ``nuts`` show a progress bar on a terminal
(``--progress``/``--no-progress`` to force it).

``describe`` prints the data summary only. Problems with the input (a missing or
malformed file, a parameter the structure lacks, a covariate the file lacks) are one
``error: ...`` line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

STRUCTURES = {"one": "OneCompartment", "two": "TwoCompartment", "three": "ThreeCompartment"}
ABSORPTIONS = ("first_order", "iv", "zero_order")
_COUNTS = {"1": "one", "2": "two", "3": "three"}
_ROUTES = {"oral": "first_order", "po": "first_order", "iv": "iv", "bolus": "iv",
           "infusion": "iv", "zero-order": "zero_order", "zero_order": "zero_order"}
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


def _structure(text: str):
    """``one``/``two``/``three`` -> (name, None); ``2cmt-oral`` -> ("two", "first_order")."""
    key = text.strip().lower()
    if key in STRUCTURES:
        return key, None
    n, sep, route = key.partition("cmt")
    route = route.lstrip("-_")
    if sep and n in _COUNTS and (route in _ROUTES or route == ""):
        return _COUNTS[n], _ROUTES.get(route, "first_order")
    raise argparse.ArgumentTypeError(
        f"expected one, two, three or NCMT-ROUTE (N in 1-3, ROUTE in "
        f"{', '.join(sorted(set(_ROUTES) - {'po', 'bolus', 'zero_order'}))}), got {text!r}")


def _prog() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name in ("genprog", "genprog-pk") else "python -m genprog.pk"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=_prog(),
                                description="Population PK on NONMEM-style data (genprog.pk).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("describe", help="summarise a NONMEM-style data file")
    d.add_argument("data", help="CSV file (NONMEM conventions)")
    d.add_argument("--lloq", type=float, default=None, help="limit of quantification")

    f = sub.add_parser("fit", help="fit a population model and write summaries and plots",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    f.add_argument("data", nargs="?", default=None,
                   help="CSV file (NONMEM conventions); default: the bundled theo_sd example")
    f.add_argument("--structure", type=_structure, default=("one", None),
                   help="one, two, three (with --absorption), or e.g. 1cmt-oral, 2cmt-iv, "
                        "1cmt-infusion, 1cmt-zero-order")
    f.add_argument("--absorption", choices=ABSORPTIONS, default=None,
                   help="absorption (default first_order; implied by NCMT-ROUTE)")
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
    f.add_argument("--npde-sim", type=_count(2), default=1000, dest="npde_sim",
                   help="NPDE replicates")
    f.add_argument("--individual", type=_count(0), default=16,
                   help="subjects in individual.png (0: no plot)")
    f.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar for vi/nuts (default: on a terminal)")
    f.add_argument("--out", default="genprog-fit", help="output folder (created if needed)")
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

    name, implied = args.structure
    if implied is not None and args.absorption is not None and args.absorption != implied:
        raise UsageError(f"--absorption {args.absorption} contradicts --structure (implies {implied})")
    absorption = implied or args.absorption or "first_order"
    structure = getattr(structural, STRUCTURES[name])(absorption=absorption)
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


def _fit(args, model, data, err):
    what = {"mle": "population maximum likelihood (FOCE-I)", "vi": "variational inference",
            "nuts": f"NUTS, {args.chains} chains x ({args.warmup} warmup + {args.draws} draws)"}
    print(f"fitting: {what[args.method]} ...", file=err, flush=True)
    if args.method == "mle":
        return model.fit(data, "mle", seed=args.seed)
    if args.method == "vi":
        return model.fit(data, "vi", draws=args.draws, seed=args.seed, progress=args.progress)
    return model.fit(data, "nuts", chains=args.chains, warmup=args.warmup, draws=args.draws,
                     seed=args.seed, progress=args.progress)


def _report_warnings(caught, err) -> None:
    for w in caught:
        if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
            continue
        print(f"warning: {w.message}", file=err)


def _read(args, err):
    from . import dataset_path
    from .data import read_nonmem

    path = args.data
    if path is None:
        path = dataset_path("theo_sd")
        print(f"no data file given: fitting the bundled example theo_sd ({path})", file=err)
    return read_nonmem(path, lloq=args.lloq)


def _describe(data) -> str:
    from .data import describe

    return describe(data)


def _run_fit(args, model, data, outdir, out, err) -> int:
    import pandas as pd

    from .diagnostics import plot_gof, plot_individual, plot_npde, residuals, vpc

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fit = _fit(args, model, data, err)
        except (ValueError, TypeError) as e:
            _report_warnings(caught, err)
            print(f"error: fit failed: {_message(e)}", file=err)
            return 2
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
    residuals(fit, npde=True, n_sim=args.npde_sim, seed=args.seed).to_csv(
        outdir / "residuals.csv", index=False, float_format="%.8g")
    written.append("residuals.csv")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_gof(fit).savefig(outdir / "gof.png", dpi=110)
        vpc(fit, n_sim=args.n_sim, seed=args.seed).savefig(outdir / "vpc.png", dpi=110)
        fig = plot_npde(fit, n_sim=args.npde_sim, seed=args.seed)
        fig.savefig(outdir / "npde.png", dpi=110)
        written += ["gof.png", "vpc.png", "npde.png"]
        a = fig.npde_table.attrs
        print(f"\nNPDE: mean {a['mean']:.3f}, variance {a['variance']:.3f}, "
              f"global p {a['p_global']:.3g}", file=out)
        if args.individual:
            plot_individual(fit, subjects=list(data.ids)[:args.individual]).savefig(
                outdir / "individual.png", dpi=110)
            written.append("individual.png")
    _report_warnings(caught, err)
    if args.method != "mle":
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
        data = _read(args, err)
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
