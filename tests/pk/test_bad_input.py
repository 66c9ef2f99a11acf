"""Bad input and faults on the population-PK side (issue 11), as case tables.

Each row is one bad input (or one of its siblings) and asserts the error type - or, for an
accepted oddity, the ONE ``DataWarning`` and the ``describe()`` note - and that the message
names the culprit: the file, the row or line, the column and the value. The fault cases of
the command line (interrupt, read-only or existing output folder, overwrite) run it in a
subprocess; the other command-line cases run ``main`` in-process with the fit replaced.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from genprog import pk
from genprog.pk import cli
from genprog.pk.data import DataWarning, check_compartments, describe, read_nonmem

HEADER = ["ID", "TIME", "DV", "AMT", "EVID", "MDV", "CMT", "WT"]
ROWS = [
    ["1", "0", "0", "100", "1", "1", "1", "70"],
    ["1", "1", "5", "0", "0", "0", "2", "70"],
    ["1", "2", "4", "0", "0", "0", "2", "70"],
    ["2", "0", "0", "100", "1", "1", "1", "80"],
    ["2", "1", "6", "0", "0", "0", "2", "80"],
    ["2", "2", "5", "0", "0", "0", "2", "80"],
]


def text(rows=ROWS, header=HEADER, sep=","):
    return "\n".join(sep.join(r) for r in [header, *rows]) + "\n"


def edited(row, column, value, rows=ROWS, header=HEADER):
    """The rows with data row ``row`` (1-based) in ``column`` set to ``value``."""
    out = [list(r) for r in rows]
    out[row - 1][header.index(column)] = value
    return out


def with_column(name, values, rows=ROWS, header=HEADER):
    """The file text with one more column ``name`` holding ``values`` (one per row)."""
    return text([[*r, v] for r, v in zip(rows, values)], [*header, name])


def file_of(content, name="bad.csv", encoding="utf-8"):
    """A case source: the file ``name`` holding ``content`` (str or bytes)."""
    def make(tmp_path):
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode(encoding))
        return path
    return make


def edit_file(row, column, value, name="bad.csv"):
    return file_of(text(edited(row, column, value)), name)


def frame_of(**changes):
    """A case source: the good rows as a DataFrame (numbers), with ``changes`` applied."""
    def make(tmp_path):
        df = pd.DataFrame([[float(x) for x in r] for r in ROWS], columns=HEADER)
        df["ID"] = df["ID"].astype(np.int64)
        for column, (index, value) in changes.items():
            df[column] = df[column].astype(
                object if isinstance(value, str) else complex if isinstance(value, complex)
                else type(value) if isinstance(value, (int, np.integer)) else float)
            df.loc[index, column] = value
        return df
    return make


# ---- errors: (id, source, error type, what the message must name) -------------------------

BIG = "9007199254740993"          # 2^53 + 1
READ_ERRORS = [
    # parse: encoding, layout, malformed rows
    ("empty-file", file_of(""), ValueError, ["bad.csv", "empty"]),
    ("header-only", file_of(text(rows=[])), ValueError, ["bad.csv", "no data rows"]),
    ("blank-lines-only", file_of("\n\n  \n"), ValueError, ["bad.csv", "empty"]),
    ("binary", file_of(bytes(range(256)) * 4), ValueError, ["bad.csv", "not a text file"]),
    ("control-character", file_of(text().replace("70", "7\x01", 1)), ValueError,
     ["bad.csv", "not a text file", "line 2"]),
    ("semicolon-separated", file_of(text(sep=";")), ValueError, ["bad.csv", "';'", "save it as CSV"]),
    ("short-row", file_of(text([*ROWS[:2], ROWS[2][:5], *ROWS[3:]])), ValueError,
     ["bad.csv line 4", "5 fields", "header has 8"]),
    ("long-row", file_of(text([*ROWS[:2], [*ROWS[2], "9"], *ROWS[3:]])), ValueError,
     ["bad.csv line 4", "9 fields", "header has 8"]),
    ("unclosed-quote", file_of(text([*ROWS[:2], ['"1', *ROWS[2][1:]], *ROWS[3:]])), ValueError,
     ["bad.csv line"]),
    ("nameless-column-with-values", file_of(with_column("", ["1"] * 6)),
     ValueError, ["bad.csv", "column 9", "no name"]),
    ("same-name-two-cases", file_of(with_column("dv", ["1"] * 6)), ValueError,
     ["bad.csv", "'DV'", "'dv'", "same name"]),
    ("missing-id-column", file_of(text([r[1:] for r in ROWS], HEADER[1:])), ValueError,
     ["bad.csv", "required column ID"]),
    ("missing-file", lambda tmp: tmp / "absent.csv", FileNotFoundError, ["absent.csv"]),
    ("folder-not-file", lambda tmp: tmp, ValueError, ["is a folder"]),
    ("not-a-source", lambda tmp: 42, TypeError, ["path or a pandas DataFrame", "int"]),
    # values checked in the dtype they are stored in (float32)
    ("dv-beyond-float32", edit_file(3, "DV", "1e300"), ValueError,
     ["bad.csv row 3", "line 4", "column DV", "1e+300", "float32"]),
    ("amt-beyond-float32", edit_file(1, "AMT", "1e39"), ValueError,
     ["bad.csv row 1", "column AMT", "1e+39", "float32"]),
    ("time-beyond-float32", edit_file(6, "TIME", "1e300"), ValueError,
     ["bad.csv row 6", "column TIME", "1e+300", "float32"]),
    ("covariate-beyond-float32", edit_file(2, "WT", "1e300"), ValueError,
     ["bad.csv row 2", "column WT", "1e+300", "float32"]),
    ("covariate-beyond-float32-frame", frame_of(WT=(4, 1e300)), ValueError,
     ["DataFrame index 4", "column WT", "1e+300", "float32"]),
    ("dv-beyond-float32-frame", frame_of(DV=(2, -1e200)), ValueError,
     ["DataFrame index 2", "column DV", "-1e+200", "float32"]),
    ("rate-beyond-float32", file_of(with_column("RATE", ["1e300"] + ["0"] * 5)),
     ValueError, ["bad.csv row 1", "column RATE", "float32"]),
    ("lloq-column-beyond-float32", file_of(with_column("LLOQ", ["0.1"] * 5 + ["1e300"])),
     ValueError, ["bad.csv row 6", "column LLOQ", "float32"]),
    ("amt-underflows-to-zero", edit_file(1, "AMT", "1e-50"), ValueError,
     ["bad.csv row 1", "column AMT", "1e-50", "becomes 0"]),
    ("dv-infinite", edit_file(2, "DV", "inf"), ValueError,
     ["bad.csv row 2", "column DV", "infinite", "'inf'"]),
    ("time-minus-infinity", edit_file(2, "TIME", "-inf"), ValueError,
     ["bad.csv row 2", "column TIME", "infinite"]),
    ("cmt-huge", edit_file(2, "CMT", "1e300"), ValueError,
     ["bad.csv row 2", "column CMT", "positive integer", "1e+300"]),
    ("addl-huge", file_of(with_column("ADDL", ["1e12"] + ["0"] * 5)), ValueError,
     ["bad.csv row 1", "column ADDL", "whole number", "1e+12"]),
    # subject IDs
    ("id-above-2^53", file_of(text(edited(4, "ID", BIG, edited(5, "ID", BIG, edited(6, "ID", BIG))))),
     ValueError, ["bad.csv row 4", "column ID", BIG, "2^53"]),
    ("id-above-2^53-frame", frame_of(ID=(0, 2 ** 53 + 1)), ValueError,
     ["DataFrame index 0", "column ID", BIG]),
    ("id-float-above-2^53-frame", frame_of(ID=(0, 1e17)), ValueError,
     ["DataFrame index 0", "column ID", "2^53"]),
    ("id-spelled-two-ways", edit_file(2, "ID", "1.0"), ValueError,
     ["bad.csv row 2", "column ID", "'1.0'", "same number", "'1'"]),
    ("id-leading-zero", edit_file(3, "ID", "01"), ValueError,
     ["bad.csv row 3", "column ID", "'01'", "same number"]),
    ("id-missing", edit_file(5, "ID", "."), ValueError, ["bad.csv row 5", "column ID", "missing"]),
    ("id-infinite", edit_file(4, "ID", "inf"), ValueError, ["bad.csv row 4", "column ID", "infinite"]),
    ("id-not-contiguous", file_of(text([ROWS[0], ROWS[3], *ROWS[1:3], *ROWS[4:]])), ValueError,
     ["bad.csv row 3", "column ID", "subject 1", "contiguous"]),
    # covariates: one bad value is an error, not a silent change of kind
    ("covariate-typo", edit_file(3, "WT", "7O"), ValueError,
     ["bad.csv row 3", "line 4", "column WT", "'7O'", "not a number", "categorical="]),
    ("covariate-typo-frame", frame_of(WT=(1, "seventy")), ValueError,
     ["DataFrame index 1", "column WT", "'seventy'", "not a number"]),
    # events
    ("time-negative", edit_file(2, "TIME", "-1"), ValueError, ["bad.csv row 2", "column TIME", "-1"]),
    ("time-missing", edit_file(2, "TIME", "."), ValueError, ["bad.csv row 2", "column TIME", "missing"]),
    ("time-nan-text", edit_file(2, "TIME", "NaN"), ValueError, ["bad.csv row 2", "column TIME", "missing"]),
    ("time-backwards", edit_file(3, "TIME", "0.5"), ValueError,
     ["bad.csv row 3", "column TIME", "backwards", "subject 1", "1 then 0.5"]),
    ("amt-negative", edit_file(4, "AMT", "-100"), ValueError, ["bad.csv row 4", "column AMT", "-100"]),
    ("evid-outside-nonmem", edit_file(2, "EVID", "5"), ValueError,
     ["bad.csv row 2", "column EVID", "EVID 5", "0 (observation)"]),
    ("evid-fraction", edit_file(2, "EVID", "0.5"), ValueError, ["bad.csv row 2", "column EVID", "0.5"]),
    ("evid-missing", edit_file(2, "EVID", "."), ValueError, ["bad.csv row 2", "column EVID", "missing"]),
    ("mdv-outside-0-1", edit_file(2, "MDV", "3"), ValueError, ["bad.csv row 2", "column MDV", "got 3"]),
    ("cmt-negative", edit_file(2, "CMT", "-2"), ValueError, ["bad.csv row 2", "column CMT", "-2"]),
    ("ss-const-infusion-with-ii", file_of(text(
        [["1", "0", "0", "0", "1", "1", "1", "70", "1", "5", "12"], *[[*r, "0", "0", "0"] for r in ROWS[1:]]],
        [*HEADER, "SS", "RATE", "II"])), ValueError,
     ["bad.csv row 1", "column II", "constant infusion", "II 0"]),
    ("ss-bolus-without-ii", file_of(text(
        [[*ROWS[0], "1", "0"], *[[*r, "0", "0"] for r in ROWS[1:]]], [*HEADER, "SS", "II"])),
     ValueError, ["bad.csv row 1", "column II", "steady-state dose needs II > 0"]),
    ("ss-infusion-with-addl", file_of(text(
        [[*ROWS[0], "1", "10", "12", "2"], *[[*r, "0", "0", "0", "0"] for r in ROWS[1:]]],
        [*HEADER, "SS", "RATE", "II", "ADDL"])), ValueError,
     ["bad.csv row 1", "column ADDL", "steady-state infusion"]),
    ("rate-disagrees-with-dur", file_of(text(
        [[*ROWS[0], "10", "2"], *[[*r, "0", "0"] for r in ROWS[1:]]], [*HEADER, "RATE", "DUR"])),
     ValueError, ["bad.csv row 1", "column DUR", "RATE 10 and DUR 2 disagree"]),
    ("rate-modelled", file_of(with_column("RATE", ["-2"] + ["0"] * 5)), ValueError,
     ["bad.csv row 1", "column RATE", "RATE -2", "not supported"]),
    ("addl-without-ii", file_of(with_column("ADDL", ["3"] + ["0"] * 5)), ValueError,
     ["bad.csv row 1", "column II", "ADDL is 3", "II > 0"]),
    ("amt-zero-on-dose", edit_file(4, "AMT", "0"), ValueError,
     ["bad.csv row 4", "column AMT", "AMT is 0 on a dose row"]),
    ("amt-on-observation", edit_file(2, "AMT", "50"), ValueError,
     ["bad.csv row 2", "column AMT", "not a dose"]),
    ("dv-missing-on-observation", edit_file(5, "DV", "."), ValueError,
     ["bad.csv row 5", "column DV", "missing on an observation row"]),
    ("cmt-missing-on-dose", edit_file(4, "CMT", "."), ValueError,
     ["bad.csv row 4", "column CMT", "missing on a dose row"]),
    ("dur-and-duration", file_of(with_column("DURATION", ["0"] * 6, [[*r, "0"] for r in ROWS],
                                             [*HEADER, "DUR"])), ValueError,
     ["bad.csv", "DUR and DURATION"]),
    ("cens-outside-0-1", file_of(with_column("CENS", ["0", "2", "0", "0", "0", "0"])), ValueError,
     ["bad.csv row 2", "column CENS", "got 2"]),
    ("limit-below-censored-dv", file_of(with_column("LIMIT", [".", "1", ".", ".", ".", "."],
                                                    [[*r, c] for r, c in zip(ROWS, "010000")],
                                                    [*HEADER, "CENS"])), ValueError,
     ["bad.csv row 2", "column LIMIT", "interval censoring"]),
    ("dv-complex-frame", frame_of(DV=(1, 5 + 2j)), ValueError,
     ["DataFrame index 1", "column DV", "not a number"]),
    # the same checks through the other parsers: quoted CSV, whitespace, UTF-16
    ("quoted-csv-short-row", file_of(text([*ROWS[:2], ['"1"', *ROWS[2][1:5]], *ROWS[3:]])),
     ValueError, ["bad.csv line 4", "5 fields", "header has 8"]),
    ("quoted-csv-bad-value", file_of(text(edited(3, "DV", '"n/d"'))), ValueError,
     ["bad.csv row 3", "column DV", "'n/d'", "not a number"]),
    ("whitespace-short-row", file_of(text([*ROWS[:4], ROWS[4][:6], ROWS[5]], sep=" ")),
     ValueError, ["bad.csv line 6", "6 fields", "header has 8"]),
    ("utf-16-bad-value", file_of(text(edited(5, "TIME", "-3")), encoding="utf-16"), ValueError,
     ["bad.csv row 5", "line 6", "column TIME", "-3"]),
    ("row-after-comment-keeps-its-line", file_of(text([["#", "x", "", "", "", "", "", ""],
                                                       *edited(2, "AMT", "-1")])),
     ValueError, ["bad.csv row 2", "line 4", "column AMT"]),
]


@pytest.mark.parametrize("make, error, needles", [c[1:] for c in READ_ERRORS],
                         ids=[c[0] for c in READ_ERRORS])
def test_read_error_names_the_culprit(make, error, needles, tmp_path):
    source = make(tmp_path)
    with pytest.raises(error) as info:
        read_nonmem(source)
    message = str(info.value)
    for needle in needles:
        assert needle in message, (needle, message)


def test_float64_storage_holds_what_float32_cannot(tmp_path):
    path = edit_file(3, "DV", "1e300")(tmp_path)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        data = read_nonmem(path)
    finally:
        torch.set_default_dtype(old)
    assert data.obs_dv[0, 1].item() == 1e300


@pytest.mark.parametrize("field", ["obs_dv", "covariates['WT']"], ids=["dv", "covariate"])
def test_narrowing_a_dataset_names_the_field_that_overflows(field, tmp_path):
    column = "DV" if field == "obs_dv" else "WT"
    path = edit_file(2 if column == "DV" else 4, column, "1e300" if column == "DV" else "5e39")(tmp_path)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        data = read_nonmem(path, covariates=["WT"])
    finally:
        torch.set_default_dtype(old)
    with pytest.raises(ValueError) as info:
        data.to(dtype=torch.float32)
    assert field in str(info.value) and "float32" in str(info.value)
    assert data.to(dtype=torch.float64).obs_dv.dtype == torch.float64


# ---- accepted oddities: ONE DataWarning, and the same notes in describe() ----------------

ODDITIES = [
    ("duplicated-dose-row", file_of(text([ROWS[0], *ROWS])),
     ["1 duplicated dose row", "both", "bad.csv row 2", "line 3"]),
    ("duplicated-observation-row", file_of(text([*ROWS[:2], ROWS[1], *ROWS[2:]])),
     ["1 duplicated observation row", "bad.csv row 3"]),
    ("mdv-0-on-dose-row", edit_file(4, "MDV", "0"), ["dose row with MDV 0", "bad.csv row 4"]),
    ("ii-without-addl-or-ss", file_of(with_column("II", ["12"] + ["0"] * 5)),
     ["II > 0 but neither ADDL nor SS", "II ignored", "bad.csv row 1"]),
    ("addl-on-observation-row", file_of(text([[*r, a, i] for r, a, i in zip(
        ROWS, ["0", "2", "0", "0", "0", "0"], ["0", "12", "0", "0", "0", "0"])],
        [*HEADER, "ADDL", "II"])), ["1 row with ADDL > 0 that is not a dose", "bad.csv row 2"]),
    ("ss-sentinel-99", file_of(with_column("SS", ["99"] + ["0"] * 5)),
     ["SS outside 0-3", "bad.csv row 1"]),
    ("comment-row-C", file_of(text([*ROWS[:2], ["C", "dropped", "", "", "", "", "", ""], *ROWS[2:]])),
     ["1 comment row skipped", "line 4"]),
    ("comment-row-hash", file_of(text([*ROWS[:3], ["# 9", "9", "9", "9", "9", "9", "9", "9"], *ROWS[3:]])),
     ["1 comment row skipped", "line 5"]),
    ("comment-row-at", file_of(text([["@", "x", "", "", "", "", "", ""], *ROWS])),
     ["1 comment row skipped", "line 2"]),
    ("comment-line-before-header", file_of("# theophylline, from R\n" + text()),
     ["1 comment row skipped", "line 1"]),
    ("comment-flag-column-C", file_of(text([[".", *ROWS[0]], ["C", *ROWS[1]], *[[".", *r] for r in ROWS[1:]]],
                                           ["C", *HEADER])),
     ["1 comment row skipped", "line 3"]),
    ("latin-1-file", file_of(with_column("SITE", ["Zürich"] * 3 + ["Genève"] * 3),
                             encoding="latin-1"), ["not UTF-8", "Windows-1252"]),
    ("covariate-one-changed-value", edit_file(3, "WT", "7"),
     ["WT varies within a subject", "subject 1", "bad.csv row 3", "7 after 70", "time-varying"]),
    ("covariate-text-varies", file_of(with_column("FOOD", ["fed", "fed", "fasted", "fed", "fed", "fed"])),
     ["column FOOD not read", "subject 1", "'fasted' after 'fed'"]),
    ("covariate-missing-for-a-subject", file_of(with_column("AGE", ["40"] * 3 + ["."] * 3)),
     ["AGE is missing on every row of 1 subject", "ID 2"]),
    ("two-oddities-one-warning", file_of(text([ROWS[0], *edited(4, "MDV", "0")])),
     ["2 oddities", "duplicated dose row", "MDV 0"]),
]


@pytest.mark.parametrize("make, needles", [c[1:] for c in ODDITIES], ids=[c[0] for c in ODDITIES])
def test_oddity_is_one_warning_and_a_note(make, needles, tmp_path):
    source = make(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = read_nonmem(source)
    ours = [w for w in caught if issubclass(w.category, DataWarning)]
    assert len(ours) == 1 and len(caught) == 1, [str(w.message) for w in caught]
    message, notes = str(ours[0].message), describe(data)
    assert message.startswith("bad.csv: read with ")
    for needle in needles:
        assert needle in message, (needle, message)
        if needle != "2 oddities":
            assert needle in notes, (needle, notes)
    assert data.summary["notes"] and data.n_subjects == 2


CLEAN = [
    ("utf-8", file_of(text())),
    ("utf-8-bom", file_of(text(), encoding="utf-8-sig")),
    ("utf-16-bom", file_of(text(), encoding="utf-16")),
    ("utf-16-le-no-bom", file_of(text(), encoding="utf-16-le")),
    ("utf-16-be-no-bom", file_of(text(), encoding="utf-16-be")),
    ("whitespace-separated", file_of(text(sep="  "))),
    ("hash-header", file_of("#" + text())),
    ("trailing-commas", file_of(text([[*r, ""] for r in ROWS], [*HEADER, ""]))),
    ("crlf-line-ends", file_of(text().replace("\n", "\r\n"))),
    ("missing-covariate-on-one-row", edit_file(3, "WT", ".")),
    ("explicit-time-varying", file_of(with_column("CRCL", ["60", "50", "40", "80", "80", "80"]))),
    ("quoted-fields", file_of(text([[f'"{x}"' for x in r] for r in ROWS]))),
    ("padded-fields", file_of(text([[f" {x} " for x in r] for r in ROWS]))),
]


@pytest.mark.parametrize("make", [c[1] for c in CLEAN], ids=[c[0] for c in CLEAN])
def test_sibling_reads_without_warning(make, tmp_path):
    source = make(tmp_path)
    tv = ["CRCL"] if "CRCL" in Path(source).read_bytes().decode("utf-8", "replace") else None
    data = read_nonmem(source, time_varying=tv)   # filterwarnings = error: no warning
    assert data.n_subjects == 2 and data.n_observations == 4
    assert data.covariates["WT"].tolist() == [70.0, 80.0]
    assert data.summary["notes"] == []


# ---- where the model meets the data: compartments -----------------------------------------

def _data(rows, **kw):
    return read_nonmem(pd.DataFrame([[float(x) for x in r] for r in rows], columns=HEADER), **kw)


COMPARTMENTS = [
    ("dose-into-cmt-3-of-1cmt-oral", pk.OneCompartment("first_order"), edited(4, "CMT", "3"),
     ValueError, ["subject 2", "TIME 0", "CMT 3", "valid: 1, 2"]),
    ("dose-into-cmt-2-of-1cmt-iv", pk.OneCompartment("iv"), edited(1, "CMT", "2"),
     ValueError, ["subject 1", "CMT 2", "valid: 1"]),
    ("dose-into-cmt-4-of-mm-ode", pk.michaelis_menten("first_order"), edited(1, "CMT", "4"),
     ValueError, ["subject 1", "CMT 4", "valid: 1, 2"]),
    ("observation-in-cmt-3", pk.OneCompartment("first_order"), edited(5, "CMT", "3"),
     DataWarning, ["1 observation(s) in compartment(s) [3]", "subject 2", "TIME 1", "central"]),
    ("observation-in-depot-of-2cmt-iv", pk.TwoCompartment("iv"), ROWS,
     DataWarning, ["4 observation(s) in compartment(s) [2]", "central compartment 1"]),
]


@pytest.mark.parametrize("structure, rows, outcome, needles", [c[1:] for c in COMPARTMENTS],
                         ids=[c[0] for c in COMPARTMENTS])
def test_check_compartments(structure, rows, outcome, needles):
    data = _data(rows)
    if outcome is ValueError:
        with pytest.raises(ValueError) as info:
            check_compartments(data, structure)
        message = str(info.value)
    else:
        with pytest.warns(DataWarning) as record:
            notes = check_compartments(data, structure)
        assert len(record) == 1 and len(notes) == 1
        message = str(record[0].message)
    assert message.startswith("DataFrame: ")
    for needle in needles:
        assert needle in message, (needle, message)


def test_check_compartments_quiet_when_they_match():
    assert check_compartments(_data(ROWS), pk.OneCompartment("first_order")) == []
    assert check_compartments(_data(ROWS), pk.michaelis_menten("first_order")) == []


# ---- command line, in-process (the fit replaced: fast) ------------------------------------

THEO = pk.dataset_path("theo_sd")


def _run(argv, capsys):
    rc = cli.main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    return rc, captured


def _error_line(captured):
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, captured.err
    return lines[0]


class _FakeFit:
    """Just enough of a point fit for the CLI to check its estimates."""

    minus2ll = float("nan")

    def summary(self):
        return pd.DataFrame({"estimate": [2.0, float("nan"), float("inf")]},
                            index=pd.Index(["cl", "v", "ka"], name="parameter"))


def _raise(error):
    def fit(self, data, method="nuts", **options):
        raise error
    return fit


CLI_USAGE = [
    # (id, extra argv, replacement of PopulationModel.fit or None, exit status, needles);
    # exit status 2 with argparse's usage message where the option itself is malformed
    ("model-evaluation-fails", [], _raise(RuntimeError("ODE solver: too many steps")), 1,
     ["fit failed", "RuntimeError", "too many steps"]),
    ("fit-value-error", [], _raise(ValueError("initial values give a non-finite density")), 2,
     ["fit failed", "non-finite density"]),
    ("non-finite-estimates", [], lambda self, data, method="nuts", **o: _FakeFit(), 1,
     ["non-finite estimates", "v: nan", "ka: inf"]),
    ("saem-not-available", ["--method", "saem"],
     _raise(ValueError("fit: unknown method 'saem'; choose from ['hmc', 'nuts']")), 2,
     ["--method saem", "not available"]),
    ("iov-without-occasion", ["--iov", "cl"], None, 2, ["--iov needs --occasion"]),
    ("occasion-without-iov", ["--occasion", "OCC"], None, 2, ["OCC"]),
    ("covariate-absent", ["--covariate", "cl=AGE"], None, 2, ["AGE"]),
    ("iiv-unknown-parameter", ["--iiv", "cl,q"], None, 2, ["'q'"]),
    ("mm-iiv-on-cl", ["--structure", "mm-oral", "--iiv", "cl"], None, 2, ["'cl'", "vmax"]),
    ("structure-unknown", ["--structure", "mm-sublingual"], None, 2, ["mm-ROUTE"]),
    ("threads-zero", ["--threads", "0"], None, 2, ["at least 1"]),
]


@pytest.mark.parametrize("argv, replacement, status, needles", [c[1:] for c in CLI_USAGE],
                         ids=[c[0] for c in CLI_USAGE])
def test_cli_error_is_one_line(argv, replacement, status, needles, tmp_path, capsys, monkeypatch):
    if replacement is not None:
        monkeypatch.setattr(pk.PopulationModel, "fit", replacement)
    out = tmp_path / "out"
    rc, captured = _run(["fit", THEO, "--iiv", "cl", "--n-sim", "2", "--npde-sim", "2",
                         "--individual", "0", *argv, "--out", str(out)], capsys)
    assert rc == status, captured.err
    by_argparse = captured.err.startswith("usage:")
    message = captured.err.splitlines()[-1] if by_argparse else _error_line(captured)
    for needle in needles:
        assert needle in message, (needle, message)
    assert not out.exists() and list(tmp_path.iterdir()) == []   # nothing, not even a temp folder


def test_cli_describe_prints_the_notes_not_a_warning(tmp_path, capsys):
    path = file_of(text([ROWS[0], *ROWS]))(tmp_path)
    rc, captured = _run(["describe", str(path)], capsys)
    assert rc == 0 and captured.err == ""
    assert "notes (1):" in captured.out and "1 duplicated dose row" in captured.out


def test_cli_refuses_the_current_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pk.PopulationModel, "fit", _raise(AssertionError("must not fit")))
    rc, captured = _run(["fit", THEO, "--out", ".", "--overwrite"], capsys)
    assert rc == 2 and "current folder" in _error_line(captured)
    assert list(tmp_path.iterdir()) == []


def test_cli_covariate_that_varies_is_named(tmp_path, capsys):
    path = tmp_path / "vary.csv"
    raw = pd.read_csv(THEO)
    raw.loc[5, "WT"] = 7.96                                  # one mistyped weight
    raw.to_csv(path, index=False)
    rc, captured = _run(["fit", str(path), "--covariate", "cl=WT", "--out", str(tmp_path / "o")],
                        capsys)
    assert rc == 2
    line = _error_line(captured)
    assert "--covariate cl=WT" in line and "varies within subjects" in line
    assert "warning: vary.csv: read with 1 oddity" in captured.err and "row 6" in captured.err


@pytest.mark.parametrize("spec, n_states, params", [
    ("mm-oral", 2, ("vmax", "km", "v", "ka")), ("mm-iv", 1, ("vmax", "km", "v")),
], ids=["mm-oral", "mm-iv"])
def test_cli_ode_structures(spec, n_states, params, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(cli, "_run_fit", lambda args, model, *rest: seen.setdefault("m", model) and 0)
    rc, captured = _run(["fit", THEO, "--structure", spec, "--out", "unused-out"], capsys)
    assert rc == 0, captured.err
    model = seen["m"]
    assert isinstance(model.structure, pk.ODEModel) and model.structure.n_states == n_states
    assert model.structure.parameters == params and "vmax" in model.random_effects
    if spec == "mm-iv":   # theo_sd observes CMT 2, which a one-state model lacks: a note
        assert "warning: " in captured.err and "compartment(s) [2]" in captured.err


def test_cli_iov_reaches_the_model(tmp_path, monkeypatch, capsys):
    raw = pd.read_csv(THEO)
    raw["OCC"] = np.where(raw.TIME < 5, 1, 2)
    path = tmp_path / "occ.csv"
    raw.to_csv(path, index=False)
    seen = {}
    monkeypatch.setattr(cli, "_run_fit", lambda args, model, *rest: seen.setdefault("m", model) and 0)
    rc, captured = _run(["fit", str(path), "--iiv", "cl,v", "--iov", "cl", "--occasion", "OCC",
                         "--out", str(tmp_path / "o")], capsys)
    assert rc == 0, captured.err
    assert seen["m"].iov == ("cl",) and seen["m"].occasion == "OCC"
    assert "warning" not in captured.err          # the occasion column is named: no note


@pytest.mark.parametrize("has_keyword", ["named", "documented", None],
                         ids=["fit-takes-threads", "fit-documents-threads", "fit-without-threads"])
def test_cli_threads(has_keyword, tmp_path, monkeypatch, capsys):
    seen = {}

    def named(self, data, method="nuts", *, threads=None, **options):
        seen["threads"] = threads
        raise RuntimeError("stop here")

    def documented(self, data, method="nuts", **options):
        """``threads=`` (every method): torch's thread count during the fit."""
        seen["threads"] = options.get("threads")
        raise RuntimeError("stop here")

    def without(self, data, method="nuts", **options):
        seen["options"], seen["torch"] = options, torch.get_num_threads()
        raise RuntimeError("stop here")

    fits = {"named": named, "documented": documented, None: without}
    monkeypatch.setattr(pk.PopulationModel, "fit", fits[has_keyword])
    before = torch.get_num_threads()
    try:
        rc, _ = _run(["fit", THEO, "--threads", "1", "--out", str(tmp_path / "o")], capsys)
    finally:
        torch.set_num_threads(before)
    assert rc == 1
    if has_keyword:
        assert seen["threads"] == 1
    else:
        assert "threads" not in seen["options"] and seen["torch"] == 1


OUTPUT_REFUSED = [
    # (id, prepare tmp_path -> --out, extra argv, needles)
    ("existing-non-empty", lambda tmp: _folder(tmp / "o", {"summary.csv": "old"}), [],
     ["exists and is not empty", "--overwrite"]),
    ("overwrite-foreign-files", lambda tmp: _folder(tmp / "o", {"data.csv": "x", "gof.png": "y"}),
     ["--overwrite"], ["did not write", "data.csv"]),
    ("out-is-a-file", lambda tmp: _folder(tmp, {"o": "x"}) / "o", [], ["not a folder"]),
    ("parent-is-a-file", lambda tmp: _folder(tmp, {"f": "x"}) / "f" / "o", [], ["cannot"]),
]


def _folder(path, files):
    path.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (path / name).write_text(content)
    return path


@pytest.mark.parametrize("prepare, argv, needles", [c[1:] for c in OUTPUT_REFUSED],
                         ids=[c[0] for c in OUTPUT_REFUSED])
def test_cli_output_refused_before_the_fit(prepare, argv, needles, tmp_path, capsys, monkeypatch):
    out = prepare(tmp_path)
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    monkeypatch.setattr(pk.PopulationModel, "fit", _raise(AssertionError("must not fit")))
    rc, captured = _run(["fit", THEO, *argv, "--out", str(out)], capsys)
    assert rc == 2
    line = _error_line(captured)
    for needle in [str(out.name), *needles]:
        assert needle in line, (needle, line)
    assert "fitting:" not in captured.err
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before


# ---- command line, in a subprocess: faults ------------------------------------------------

FAST = ["--structure", "1cmt-oral", "--iiv", "cl", "--error", "additive", "--n-sim", "2",
        "--npde-sim", "2", "--individual", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _cli(*argv, **kw):
    return subprocess.run([sys.executable, "-m", "genprog.pk", *argv], capture_output=True,
                          text=True, timeout=300, env=ENV, check=False, **kw)


def _partials(folder):
    return [p for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("sig, old_results, status, word", [
    (signal.SIGINT, False, 130, "interrupted"), (signal.SIGINT, True, 130, "interrupted"),
    (signal.SIGTERM, False, 143, "terminated"),
], ids=["sigint-no-old-results", "sigint-old-results-kept", "sigterm-no-old-results"])
def test_cli_interrupt_leaves_old_results_or_none(sig, old_results, status, word, tmp_path):
    out = tmp_path / "o"
    if old_results:
        _folder(out, {"summary.csv": "old run"})
    proc = subprocess.Popen([sys.executable, "-m", "genprog.pk", "fit", THEO, *FAST,
                             "--out", str(out), *(["--overwrite"] if old_results else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 120
    while not _partials(tmp_path) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert _partials(tmp_path), "the temporary folder never appeared"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(word) and str(out) in last
    assert [ln for ln in err.splitlines() if ln.startswith((word, "error"))] == [last]
    assert _partials(tmp_path) == []
    if old_results:
        assert (out / "summary.csv").read_text() == "old run" and "left as it was" in last
    else:
        assert not out.exists() and "nothing written" in last


def test_cli_overwrite_replaces_old_results_atomically(tmp_path):
    """(Without --overwrite the same folder is refused: test_cli_output_refused_before_the_fit.)"""
    out = _folder(tmp_path / "o", {"summary.csv": "old run", "vpc.png": "old plot"})
    done = _cli("fit", THEO, *FAST, "--out", str(out), "--overwrite")
    assert done.returncode == 0, done.stderr
    assert (out / "summary.csv").read_text() != "old run"
    assert not (out / "vpc.png").read_bytes().startswith(b"old")        # no old plot left
    assert {"summary.csv", "individual.csv", "residuals.csv", "gof.png"} <= {p.name for p in out.iterdir()}
    assert _partials(tmp_path) == []


@pytest.mark.parametrize("kind", ["proc-filesystem", "chmod-read-only"])
def test_cli_unwritable_output_fails_before_the_fit(kind, tmp_path):
    if kind == "proc-filesystem":
        if not Path("/proc/self").exists():
            pytest.skip("no /proc on this system")
        out = Path("/proc/genprog-test-out")
    else:
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            pytest.skip("root ignores folder permissions (the /proc case covers it)")
        locked = _folder(tmp_path / "locked", {})
        locked.chmod(0o555)
        out = locked / "o"
    try:
        r = _cli("fit", THEO, *FAST, "--out", str(out))
    finally:
        if kind == "chmod-read-only":
            (tmp_path / "locked").chmod(0o755)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(out) in last and "cannot" in last
    assert "fitting:" not in r.stderr           # refused before the fit
    assert not out.exists()
