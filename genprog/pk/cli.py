"""Command line: ``genprog`` (also ``genprog-pk`` and ``python -m genprog.pk``).

``fit`` reads a NONMEM-style CSV file, fits a population model and writes the results::

    genprog fit theo_sd.csv --structure 1cmt-oral --iiv ka,cl,v --error combined \\
        --covariate cl=WT --method mle --out results/

``--structure`` is ``one``/``two``/``three`` (with ``--absorption``), the short form
``{1,2,3}cmt-{oral,iv,infusion,zero-order}``, or a Michaelis-Menten ODE model
``mm-{oral,iv,infusion,zero-order}`` (:func:`genprog.pk.michaelis_menten`: ``vmax``, ``km``,
``v``, ``ka``/``d1``). ``--iov cl,v --occasion OCC`` adds inter-occasion variability over
the data set's ``OCC`` column. ``--method`` is ``mle`` (FOCE-I), ``saem``, ``vi`` or
``nuts``; ``--threads N`` limits the CPU threads. Without a data file (``genprog fit``) the
bundled theophylline example (``pk.dataset_path("theo_sd")``) is fitted.

It prints the data summary (:func:`genprog.pk.describe`), the parameter table and, for
point fits, -2LL/OFV/AIC/BIC and one ``warning:`` line for every subject whose EBE the
fit flagged in the flip-flop mode (:func:`flip_flop_lines`), and writes into ``--out``
(default ``genprog-fit``): ``summary.csv``, ``individual.csv`` (individual parameters: at the EBEs, with the etas,
for ``mle``; posterior means for ``vi``/``nuts``), ``residuals.csv`` (with NPDE),
``gof.png``, ``vpc.png``, ``npde.png``, ``individual.png`` (the first ``--individual``
subjects); for ``vi``/``nuts`` also ``posterior.nc`` (ArviZ InferenceData as netCDF,
:func:`genprog.load`). ``vi`` and ``nuts`` show a progress bar on a terminal
(``--progress``/``--no-progress`` to force it).

Results are written atomically: into a temporary folder ``.NAME.partial-*`` next to
``--out``, renamed to ``--out`` when everything is written. An existing non-empty ``--out``
is refused unless ``--overwrite`` (and even then only when it holds nothing but genprog
results). The output folder is checked before the fit. An interrupt (Ctrl-C) leaves the
old results or none, and exits with status 130 and one line.

``describe`` prints the data summary only. Problems with the input (a missing or
malformed file, a parameter the structure lacks, a covariate the file lacks, an output
folder that cannot be written) are one ``error: ...`` line on stderr and exit status 2,
never a traceback; SIGTERM is handled like an interrupt (exit status 143); a fit that fails or gives non-finite estimates is one line and exit
status 1 (``--traceback`` shows the Python traceback instead, for bug reports).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import pandas as pd
import torch

from genprog.pk.data import DataWarning, check_compartments, describe, read_nonmem
from genprog.pk.dataset import dataset_path
from genprog.pk.diagnostics import plot_gof, plot_individual, plot_npde, residuals, vpc
from genprog.pk.ode import michaelis_menten
from genprog.pk.population import PopulationModel
from genprog.pk.structural import OneCompartment, ThreeCompartment, TwoCompartment

STRUCTURES = {"one": OneCompartment, "two": TwoCompartment, "three": ThreeCompartment}
ABSORPTIONS = ("first_order", "iv", "zero_order")
_COUNTS = {"1": "one", "2": "two", "3": "three"}
_ROUTES = {"oral": "first_order", "po": "first_order", "iv": "iv", "bolus": "iv",
           "infusion": "iv", "zero-order": "zero_order", "zero_order": "zero_order"}
ERRORS = ("additive", "proportional", "combined", "exponential")
METHODS = ("mle", "saem", "vi", "nuts")
#: Files a fit writes; ``--overwrite`` replaces a folder holding only these.
RESULT_FILES = frozenset({"summary.csv", "individual.csv", "residuals.csv", "gof.png",
                          "vpc.png", "npde.png", "individual.png", "posterior.nc"})
EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 1, 130, 143


class UsageError(Exception):
    """A problem with the command's input, reported as ``error: ...`` (exit status 2)."""


class FitFailed(Exception):
    """The fit or the writing of its results failed (exit status 1)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like an interrupt (exit status 143)."""


# ---- arguments -----------------------------------------------------------------------------


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
    """``one``/``two``/``three`` -> (name, None); ``2cmt-oral`` -> ("two", "first_order");
    ``mm-iv`` -> ("mm", "iv")."""
    key = text.strip().lower()
    if key in STRUCTURES:
        return key, None
    if key.startswith("mm"):
        route = key[2:].lstrip("-_")
        if route in _ROUTES or route == "":
            return "mm", _ROUTES.get(route, "first_order")
    n, sep, route = key.partition("cmt")
    route = route.lstrip("-_")
    if sep and n in _COUNTS and (route in _ROUTES or route == ""):
        return _COUNTS[n], _ROUTES.get(route, "first_order")
    routes = ", ".join(sorted(set(_ROUTES) - {"po", "bolus", "zero_order"}))
    raise argparse.ArgumentTypeError(
        f"expected one, two, three, NCMT-ROUTE (N in 1-3) or mm-ROUTE (Michaelis-Menten), "
        f"ROUTE in {routes}; got {text!r}")


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
                   help="one, two, three (with --absorption), e.g. 1cmt-oral, 2cmt-iv, "
                        "1cmt-infusion, 1cmt-zero-order, or Michaelis-Menten mm-oral, mm-iv")
    f.add_argument("--absorption", choices=ABSORPTIONS, default=None,
                   help="absorption (default first_order; implied by NCMT-ROUTE)")
    f.add_argument("--iiv", default=None,
                   help="comma-separated parameters with IIV, or 'none' "
                        "(default: cl or vmax, the central volume and ka if absorbed first-order)")
    f.add_argument("--omega", choices=("diagonal", "block"), default="diagonal")
    f.add_argument("--iov", default=None, metavar="PARAMS",
                   help="comma-separated parameters with inter-occasion variability "
                        "(needs --occasion)")
    f.add_argument("--occasion", default=None, metavar="COL",
                   help="the data set's occasion column (for --iov)")
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
    f.add_argument("--threads", type=_count(1), default=None,
                   help="CPU threads for the fit (default: torch's)")
    f.add_argument("--n-sim", type=_count(1), default=200, dest="n_sim", help="VPC replicates")
    f.add_argument("--npde-sim", type=_count(2), default=1000, dest="npde_sim",
                   help="NPDE replicates")
    f.add_argument("--individual", type=_count(0), default=16,
                   help="subjects in individual.png (0: no plot)")
    f.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar for vi/nuts (default: on a terminal)")
    f.add_argument("--out", default="genprog-fit", help="output folder (created if needed)")
    f.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty --out (only genprog results in it)")
    f.add_argument("--traceback", action="store_true",
                   help="on a failure, show the Python traceback (for bug reports)")
    return p


def _names(text: str) -> list:
    return [p.strip().lower() for p in text.split(",") if p.strip()]


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


# ---- data and model ------------------------------------------------------------------------


def _read(args, err):
    path = args.data
    if path is None:
        path = dataset_path("theo_sd")
        print(f"no data file given: fitting the bundled example theo_sd ({path})", file=err)
    occasion = getattr(args, "occasion", None)
    return read_nonmem(path, lloq=args.lloq, time_varying=[occasion] if occasion else None)


def _structure_model(args):
    name, implied = args.structure
    if implied is not None and args.absorption is not None and args.absorption != implied:
        raise UsageError(f"--absorption {args.absorption} contradicts --structure "
                         f"(implies {implied})")
    absorption = implied or args.absorption or "first_order"
    if name == "mm":
        return michaelis_menten(absorption=absorption)
    return STRUCTURES[name](absorption=absorption)


def _model(args, data):
    structure = _structure_model(args)
    params = structure.parameters
    if args.iiv is None:
        iiv = [p for p in ("cl", "vmax", "v", "v1", "ka") if p in params]
    elif args.iiv.strip().lower() == "none":
        iiv = []
    else:
        iiv = _names(args.iiv)
    iov = _names(args.iov) if args.iov else []
    if iov and not args.occasion:
        raise UsageError("--iov needs --occasion COL (the data set's occasion column)")
    if args.occasion and not iov:
        raise UsageError("--occasion is used only with --iov PARAMS")
    dvid = args.dvid
    if dvid is not None and dvid not in data.dvid_names:
        raise UsageError(f"--dvid: no observation type {dvid!r} in the data "
                         f"(it has {data.dvid_names})")
    covariates = _covariates(args.covariate)
    _check_covariates_in(data, covariates)
    model = PopulationModel(structure=structure, random_effects=iiv, error=args.error,
                            covariates=covariates, omega=args.omega, dvid=dvid,
                            iov=iov, occasion=args.occasion)
    model.check_data(data)
    check_compartments(data, structure)
    return model


def _check_covariates_in(data, covariates) -> None:
    """A covariate that was read as time-varying or not read gets its own message."""
    time_varying = {k.lower(): k for k in data.time_varying}
    ignored = {str(k).lower(): (k, why) for k, why in
               data.summary.get("ignored_columns", {}).items()}
    for param, effects in covariates.items():
        for name, _ in effects:
            key = name.lower()
            if key in time_varying:
                raise UsageError(
                    f"--covariate {param}={name}: {time_varying[key]} varies within subjects "
                    "(read as time-varying; see the notes above); a covariate effect needs "
                    "one value per subject - fix the data or choose another covariate")
            if key in ignored:
                raise UsageError(f"--covariate {param}={name}: column {ignored[key][0]} was "
                                 f"not read: {ignored[key][1]}")


# ---- output folder -------------------------------------------------------------------------


class _Output:
    """``--out``, written atomically: a staging folder next to it, renamed at the end."""

    def __init__(self, path, overwrite: bool, interrupts: _Interrupts | None = None):
        self.path = Path(path).expanduser().absolute()
        self.overwrite = overwrite
        self.interrupts = interrupts or _Interrupts()
        self.staging: Path | None = None
        self.committed = False

    def check(self) -> None:
        """Refuse, before any fit, what cannot or should not be written (UsageError)."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a folder; choose a folder")
        if out.is_dir():
            present = sorted(p.name for p in out.iterdir())
            if present and not self.overwrite:
                raise UsageError(f"--out {out} exists and is not empty ({_listing(present)}); "
                                 "add --overwrite to replace it, or choose another folder")
            foreign = [n for n in present if n not in RESULT_FILES]
            if foreign:
                raise UsageError(f"--out {out} holds files that genprog did not write "
                                 f"({_listing(foreign)}); --overwrite would delete them: "
                                 "choose another folder")
            if Path.cwd().resolve().is_relative_to(out.resolve()):
                raise UsageError(f"--out {out} is the current folder (or holds it); choose "
                                 "another folder")
        parent = out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--out {out}: cannot create its parent folder ({_message(e)})") \
                from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"--out {out}: cannot write in {parent} (permission denied); "
                             "choose another folder")

    def stage(self) -> Path:
        """Create the staging folder (the real writability check, before the fit)."""
        try:
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.partial-",
                                                 dir=self.path.parent))
            self.staging.chmod(0o777 & ~_umask())   # mkdtemp's 0700 -> a normal folder
        except OSError as e:
            raise UsageError(f"--out {self.path}: cannot write in {self.path.parent} "
                             f"({_message(e)}); choose another folder") from None
        return self.staging

    def commit(self) -> None:
        """Replace ``--out`` by the staging folder (interrupts deferred meanwhile); an
        interrupt received before (even one that an import swallowed) stops it."""
        self.interrupts.check()
        with _interrupts_ignored():
            old = None
            if self.path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.old-",
                                            dir=self.path.parent))
                os.rename(self.path, old / "results")
            try:
                os.rename(self.staging, self.path)
            except OSError:
                if old is not None:
                    os.rename(old / "results", self.path)
                raise
            self.staging = None
            self.committed = True
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        """Remove the staging folder (after a failure or an interrupt)."""
        if self.staging is not None:
            with _interrupts_ignored():
                shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None


@contextlib.contextmanager
def _interrupts_ignored():
    """SIGINT and SIGTERM are ignored inside the block (main thread only): a rename pair
    is not split, a clean-up is not cut short."""
    with _signal_handlers(dict.fromkeys((signal.SIGINT, signal.SIGTERM), signal.SIG_IGN)):
        yield


class _Interrupts:
    """SIGINT and SIGTERM during a command: remembered, and raised at once as
    ``KeyboardInterrupt`` / :class:`Terminated` so that a long fit stops. Remembering
    matters: an interrupt that lands inside an import or a callback can be swallowed or
    turned into another error, and must still end the command as an interrupt."""

    def __init__(self):
        self.received = None

    def _handle(self, signum, frame):
        self.received = signum
        self.check()

    @contextlib.contextmanager
    def catching(self):
        with _signal_handlers({signal.SIGINT: self._handle, signal.SIGTERM: self._handle}):
            yield

    def check(self) -> None:
        """Raise for an interrupt received so far."""
        if self.received == signal.SIGTERM:
            raise Terminated
        if self.received is not None:
            raise KeyboardInterrupt


@contextlib.contextmanager
def _signal_handlers(handlers: dict):
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _listing(names, most: int = 5) -> str:
    more = f", ... ({len(names) - most} more)" if len(names) > most else ""
    return ", ".join(names[:most]) + more


# ---- fit -----------------------------------------------------------------------------------


def _fit(args, model, data, err):
    what = {"mle": "population maximum likelihood (FOCE-I)", "saem": "SAEM",
            "vi": "variational inference",
            "nuts": f"NUTS, {args.chains} chains x ({args.warmup} warmup + {args.draws} draws)"}
    options = {"seed": args.seed}
    if args.method in ("vi", "nuts"):
        options.update(draws=args.draws, progress=args.progress)
    if args.method == "nuts":
        options.update(chains=args.chains, warmup=args.warmup)
    if args.threads is not None:
        if _accepts_keyword(model.fit, "threads"):
            options["threads"] = args.threads
        else:
            torch.set_num_threads(args.threads)
    print(f"fitting: {what[args.method]} ...", file=err, flush=True)
    try:
        return model.fit(data, args.method, **options)
    except (ValueError, TypeError) as e:
        if args.traceback:
            raise
        if args.method == "saem" and "saem" in str(e).lower():
            raise UsageError("--method saem: SAEM is not available in this version of "
                             f"genprog ({_message(e)}); use --method mle") from None
        raise UsageError(f"fit failed: {_message(e)}") from None


def _accepts_keyword(fn, name: str) -> bool:
    """Whether ``fn`` takes ``name=``: a named parameter, or ``**options`` whose docstring
    documents ``name=``."""
    parameters = inspect.signature(fn).parameters
    if name in parameters:
        return True
    variadic = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return variadic and f"{name}=" in (inspect.getdoc(fn) or "")


def _check_finite(fit, table: pd.DataFrame) -> None:
    """FitFailed when an estimate (or -2LL) is not finite."""
    column = next((c for c in ("estimate", "mean", "median") if c in table.columns), None)
    if column is not None:
        values = pd.to_numeric(table[column], errors="coerce")
        bad = values[~values.map(math.isfinite)]
        if len(bad):
            shown = ", ".join(f"{k}: {v}" for k, v in list(bad.items())[:6])
            raise FitFailed(f"the fit gave non-finite estimates ({shown}); check the data "
                            "(units, outliers) and the model, or try another --method")
    m2ll = getattr(fit, "minus2ll", None)
    if m2ll is not None and not math.isfinite(float(m2ll)):
        raise FitFailed(f"the fit gave a non-finite -2LL ({float(m2ll)}); check the data "
                        "(units, outliers) and the model, or try another --method")


def _report_warnings(caught, err, skip=()) -> None:
    seen = set()
    for w in caught:
        if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning,
                                   FutureWarning, *skip)):
            continue
        text = " ".join(str(w.message).split())
        if text not in seen:
            seen.add(text)
            print(f"warning: {text}", file=err)


def _run_fit(args, model, data, output, out, err) -> int:
    """Fit, then write every result into the staging folder and commit it."""
    output = output if isinstance(output, _Output) else _Output(output, args.overwrite)
    stage = output.stage()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                fit = _fit(args, model, data, err)
            finally:
                _report_warnings(caught, err)
        table = fit.summary()
        _check_finite(fit, table)
        written = _write_results(args, model, data, fit, table, stage, out, err)
        output.commit()
    finally:
        output.discard()
    print(f"\nwrote {', '.join(written)} to {output.path}", file=out)
    return 0


def _write_results(args, model, data, fit, table, stage, out, err) -> list:
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(f"\n{model.structure} | IIV {list(model.random_effects)} | {model.error} error | "
              f"method {args.method}", file=out)
        print(table.to_string(float_format=lambda x: f"{x:.4g}"), file=out)
    table.to_csv(stage / "summary.csv", float_format="%.8g")
    written = ["summary.csv"]
    if getattr(fit, "minus2ll", None) is not None:
        print(f"\n-2LL {fit.minus2ll:.3f}   OFV {fit.ofv:.3f}   AIC {fit.aic:.3f}   "
              f"BIC {fit.bic:.3f}   (n_obs {fit.n_obs}, n_params {fit.n_params}, "
              f"converged {fit.converged})", file=out)
    elif "elpd_loo" in table.attrs:
        print(f"\nelpd_loo {table.attrs['elpd_loo']:.3f} (se {table.attrs['elpd_loo_se']:.3f}, "
              f"p_loo {table.attrs['p_loo']:.2f})", file=out)
    individual = fit.individual_parameters()
    for line in flip_flop_lines(fit, individual):
        print(line, file=out)
    eta = getattr(fit, "eta", None)      # point fits: the EBEs [S, n_random]
    if torch.is_tensor(eta) and eta.dim() == 2 and eta.shape[0] == len(individual):
        for j, p in enumerate(model.random_effects):
            individual[f"eta_{p}"] = eta[:, j].detach().cpu().numpy()
    individual.to_csv(stage / "individual.csv", float_format="%.8g")
    written.append("individual.csv")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            written += _write_diagnostics(args, data, fit, stage, out)
        finally:
            _report_warnings(caught, err)
    if args.method in ("vi", "nuts"):
        fit.save(stage / "posterior.nc")
        written.append("posterior.nc")
    return written


def flip_flop_lines(fit, individual=None) -> list:
    """One ``warning:`` line per subject whose EBE the fit flagged in the flip-flop mode of
    a one-compartment oral model (``fit.info["flip_flop_subjects"]``, their IDs: ``ka_i <
    k_i = CL_i/V_i`` while the typical ka > k), with its ``ka_i`` and ``k_i`` when
    ``individual`` (the fit's individual parameters, one row per ID) has them."""
    info = getattr(fit, "info", None) or {}
    lines = []
    for subject in info.get("flip_flop_subjects") or ():
        rates = ""
        if individual is not None and {"ka", "cl", "v"} <= set(individual.columns) and subject in individual.index:
            row = individual.loc[subject]
            rates = f" (ka_i {float(row['ka']):.4g} < k_i = CL_i/V_i {float(row['cl']) / float(row['v']):.4g})"
        lines.append(f"warning: subject {subject}: EBE in the flip-flop mode{rates}, the mirror "
                     "image of the population's ka > k; its ka and V may be swapped: check its "
                     "absorption data, or refit with ka_above_k=True")
    return lines


def _write_diagnostics(args, data, fit, stage, out) -> list:
    """Residuals (with NPDE) and the four plots, into ``stage``; the names written."""
    residuals(fit, npde=True, n_sim=args.npde_sim, seed=args.seed).to_csv(
        stage / "residuals.csv", index=False, float_format="%.8g")
    written = ["residuals.csv"]
    plot_gof(fit).savefig(stage / "gof.png", dpi=110)
    vpc(fit, n_sim=args.n_sim, seed=args.seed).savefig(stage / "vpc.png", dpi=110)
    fig = plot_npde(fit, n_sim=args.npde_sim, seed=args.seed)
    fig.savefig(stage / "npde.png", dpi=110)
    written += ["gof.png", "vpc.png", "npde.png"]
    a = fig.npde_table.attrs
    print(f"\nNPDE: mean {a['mean']:.3f}, variance {a['variance']:.3f}, "
          f"global p {a['p_global']:.3g}", file=out)
    if args.individual:
        plot_individual(fit, subjects=list(data.ids)[:args.individual]).savefig(
            stage / "individual.png", dpi=110)
        written.append("individual.png")
    return written


# ---- main ----------------------------------------------------------------------------------


def main(argv=None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit
    status: 0 success, 1 the fit failed (one ``error: ...`` line), 2 bad input (one
    ``error: ...`` line on stderr; argparse's own usage errors exit 2 as well), 130
    interrupted and 143 terminated (one line; without ``argv``, as the program, the
    process ends there with that status)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, or argparse's usage error (already printed)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    out, err = sys.stdout, sys.stderr
    interrupts = _Interrupts()
    output = _Output(args.out, args.overwrite, interrupts) if args.command == "fit" else None
    try:
        with interrupts.catching():
            status = _command(args, output, out, err)
        interrupts.check()
        return status
    except KeyboardInterrupt as e:
        return _interrupted(output, isinstance(e, Terminated), err, program=argv is None)
    except (UsageError, ValueError, TypeError, OSError) as e:
        if interrupts.received is not None:    # an interrupt turned into another error
            return _interrupted(output, interrupts.received == signal.SIGTERM, err,
                                program=argv is None)
        if getattr(args, "traceback", False):
            raise
        print(f"error: {_message(e)}", file=err)
        return EXIT_USAGE
    except Exception as e:   # the fit or the diagnostics failed: one line, not a traceback
        if interrupts.received is not None:
            return _interrupted(output, interrupts.received == signal.SIGTERM, err,
                                program=argv is None)
        if getattr(args, "traceback", False):
            raise
        what = str(e) if isinstance(e, FitFailed) else f"{type(e).__name__}: {_message(e)}"
        print(f"error: fit failed: {' '.join(what.split())} (--traceback for details)"
              if not isinstance(e, FitFailed) else f"error: {what}", file=err)
        return EXIT_FAILED


def _interrupted(output, terminated: bool, err, program: bool = False) -> int:
    """The one line for an interrupt, and its exit status. As the program (``main()``
    without ``argv``), end the process here: an interrupt that landed inside an import or
    a callback can leave CPython set to die by SIGINT at exit, which would replace the
    status by -2."""
    where = "" if output is None else (
        f" after the results were written to {output.path}" if output.committed
        else f"; {output.path} left as it was" if output.path.exists()
        else f"; nothing written to {output.path}")
    print(f"{'terminated' if terminated else 'interrupted'}{where}", file=err, flush=True)
    status = EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    if program:
        sys.stdout.flush()
        os._exit(status)
    return status


def _command(args, output, out, err) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            data = _read(args, err)
            if args.command == "describe":
                print(describe(data), file=out)
                return 0
            print(describe(data), file=out)
            model = _model(args, data)
        finally:   # describe shows the data notes itself
            _report_warnings(caught, err,
                             skip=(DataWarning,) if args.command == "describe" else ())
    output.check()
    return _run_fit(args, model, data, output, out, err)


def _message(e: Exception) -> str:
    if isinstance(e, OSError) and e.filename:
        return f"{e.strerror or type(e).__name__}: {e.filename}"
    return " ".join(str(e).split()) or type(e).__name__
