"""NONMEM reader: shipped data sets checked against pandas counts of the same file,
hand-made event tables with hand-computed answers, and every malformed case raising a
``ValueError`` that names the row and the column."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from genprog.pk.data import DataWarning, describe, read_nonmem

DATASETS = Path(__file__).resolve().parents[2] / "genprog" / "pk" / "datasets"


def frame(**cols):
    return pd.DataFrame(cols)


# ---- shipped data sets: the oracle is pandas on the same file ----------------------


def test_theo_sd():
    raw = pd.read_csv(DATASETS / "theo_sd.csv")
    data = read_nonmem(DATASETS / "theo_sd.csv")
    assert data.n_subjects == 12 and data.ids == list(raw.ID.unique())
    assert data.obs_time.shape == (12, 11) and data.dose_time.shape == (12, 1)
    assert data.obs_mask.all() and data.dose_mask.all() and data.n_observations == 132
    assert data.obs_time.dtype == torch.get_default_dtype()
    doses = raw[raw.EVID == 1].set_index("ID")
    assert data.dose_time.squeeze(1).tolist() == [0.0] * 12
    assert data.dose_cmt.squeeze(1).tolist() == [1] * 12
    torch.testing.assert_close(data.dose_amt.squeeze(1).double(),
                               torch.tensor(doses.loc[data.ids, "AMT"].to_numpy()))
    assert (data.dose_rate == 0).all() and (data.dose_ss == 0).all()
    obs = raw[raw.EVID == 0]
    for s, i in enumerate(data.ids):
        o = obs[obs.ID == i]
        torch.testing.assert_close(data.obs_time[s].double(), torch.tensor(o.TIME.to_numpy()))
        torch.testing.assert_close(data.obs_dv[s].double(), torch.tensor(o.DV.to_numpy()))
    assert (data.obs_cmt == 2).all() and (data.obs_dvid == 0).all()
    assert data.dvid_names == ["dv"] and not data.obs_blq.any()
    assert data.obs_lloq.isnan().all()
    wt = raw.groupby("ID").WT.first().loc[data.ids].to_numpy()
    torch.testing.assert_close(data.covariates["WT"].double(), torch.tensor(wt))
    assert list(data.covariates) == ["WT"] and data.time_varying == {}
    assert data.summary["subjects"] == 12 and data.summary["observations"] == 132
    assert data.summary["doses"] == 12 and data.summary["excluded_rows"] == 0


def test_theo_sd_with_rxode2_evid_101_reads_the_same():
    raw = pd.read_csv(DATASETS / "theo_sd.csv")
    ref = read_nonmem(raw)
    alt = read_nonmem(raw.assign(EVID=raw.EVID.replace(1, 101)))
    for name in ("dose_time", "dose_amt", "dose_cmt", "obs_time", "obs_dv", "obs_mask"):
        assert torch.equal(getattr(alt, name), getattr(ref, name)), name
    assert alt.summary["doses"] == 12


def test_warfarin_lower_case_dvid_and_sex():
    raw = pd.read_csv(DATASETS / "warfarin.csv")
    data = read_nonmem(DATASETS / "warfarin.csv")
    assert data.n_subjects == raw.id.nunique() == 32
    assert data.ids == list(raw.id.unique())
    assert data.dvid_names == ["cp", "pca"]
    obs = raw[raw.evid == 0]
    for code, name in enumerate(data.dvid_names):
        assert int(((data.obs_dvid == code) & data.obs_mask).sum()) == (obs.dvid == name).sum()
    per_subject = obs.groupby("id", sort=False).size().loc[data.ids].tolist()
    assert data.obs_mask.sum(1).tolist() == per_subject
    # padding: masks are a prefix, padded times repeat the last time (non-decreasing)
    assert (data.obs_mask.cummin(1).values == data.obs_mask).all()
    assert (data.obs_time.diff(dim=1) >= 0).all()
    assert (data.obs_dv[~data.obs_mask] == 0).all()
    assert data.categories["sex"] == ["female", "male"]
    sex = raw.groupby("id").sex.first().loc[data.ids]
    assert data.covariates["sex"].dtype == torch.long
    assert data.covariates["sex"].tolist() == [["female", "male"].index(x) for x in sex]
    torch.testing.assert_close(data.covariates["age"].double(),
                               torch.tensor(raw.groupby("id").age.first().loc[data.ids]
                                            .to_numpy(float)))
    assert set(data.covariates) == {"wt", "age", "sex"}


def test_pheno_sd_repeated_doses():
    raw = pd.read_csv(DATASETS / "pheno_sd.csv")
    data = read_nonmem(DATASETS / "pheno_sd.csv")
    assert data.n_subjects == raw.ID.nunique() == 59
    assert data.summary["doses"] == int(data.dose_mask.sum()) == (raw.EVID == 1).sum()
    assert data.n_observations == data.summary["observations"] == (raw.EVID == 0).sum()
    assert data.dose_mask.sum(1).tolist() == \
        raw[raw.EVID == 1].groupby("ID", sort=False).size().loc[data.ids].tolist()
    assert int(data.dose_mask.sum(1).max()) > 1
    doses = raw[raw.EVID == 1]
    s = data.ids.index(1)
    n1 = int(data.dose_mask[s].sum())
    torch.testing.assert_close(data.dose_time[s, :n1].double(),
                               torch.tensor(doses[doses.ID == 1].TIME.to_numpy()))
    torch.testing.assert_close(data.dose_amt[s, :n1].double(),
                               torch.tensor(doses[doses.ID == 1].AMT.to_numpy()))
    assert (data.dose_amt[~data.dose_mask] == 0).all()
    assert (data.dose_time.diff(dim=1) >= 0).all()
    assert set(data.covariates) == {"WT", "APGR"}


def test_default_dtype_is_used():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        data = read_nonmem(DATASETS / "theo_sd.csv")
    finally:
        torch.set_default_dtype(old)
    assert data.obs_dv.dtype == data.dose_amt.dtype == data.covariates["WT"].dtype == torch.float64
    assert data.dose_cmt.dtype == data.obs_epoch.dtype == torch.long
    assert data.obs_mask.dtype == data.obs_blq.dtype == torch.bool


# ---- hand-made event tables ---------------------------------------------------------


def test_addl_expansion_and_sorting():
    df = frame(ID=[1, 1, 1, 1], TIME=[0.0, 5.0, 20.0, 40.0], AMT=[100.0, 0, 50, 0],
               II=[12.0, 0, 0, 0], ADDL=[3, 0, 0, 0], EVID=[1, 0, 1, 0],
               DV=[np.nan, 3.0, np.nan, 2.0])
    data = read_nonmem(df)
    assert data.dose_time.tolist() == [[0.0, 12.0, 20.0, 24.0, 36.0]]
    assert data.dose_amt.tolist() == [[100.0, 100.0, 50.0, 100.0, 100.0]]
    assert data.dose_ii.tolist() == [[0.0] * 5] and data.dose_ss.tolist() == [[0] * 5]
    assert data.summary["doses"] == 5 and data.summary["dose_rows"] == 2


def test_steady_state_values():
    df = frame(ID=[1, 1, 2, 2, 3, 3, 4, 4], TIME=[0.0, 1, 0, 1, 0, 1, 0, 1],
               AMT=[10.0, 0] * 4, EVID=[1, 0] * 4, DV=[0.0, 1] * 4,
               II=[24.0, 0, 24, 0, 12, 0, 0, 0], SS=[1, 99, 2, 0, 3, 0, 99, 99],
               ADDL=[2, 0, 0, 0, 0, 0, 0, 0])
    with pytest.warns(DataWarning, match=r"1 dose row with SS outside 0-3 .*index 6"):
        data = read_nonmem(df)
    assert data.dose_ss[:, 0].tolist() == [1, 2, 1, 0]      # SS 3 reads as 1, 99 as 0
    assert data.dose_ii[:, 0].tolist() == [24.0, 24.0, 12.0, 0.0]
    # subject 1: the steady-state dose then two ordinary additional doses
    assert data.dose_time[0].tolist() == [0.0, 24.0, 48.0]
    assert data.dose_ss[0].tolist() == [1, 0, 0] and data.dose_ii[0].tolist() == [24.0, 0, 0]
    assert data.summary["ss_ignored"] == 1                    # the 99 on subject 4's dose


def test_rate_and_duration_give_the_same_infusion():
    base = {"ID": [1, 1, 2, 2], "TIME": [0.0, 3, 0, 3], "AMT": [100.0, 0, 60, 0],
            "EVID": [1, 0, 1, 0], "DV": [0.0, 4, 0, 2]}
    by_rate = read_nonmem(frame(**base, RATE=[50.0, 0, 0, 0]))
    by_dur = read_nonmem(frame(**base, DUR=[2.0, 0, 0, 0]))
    assert by_rate.dose_rate.tolist() == by_dur.dose_rate.tolist() == [[50.0], [0.0]]
    both = read_nonmem(frame(**base, RATE=[50.0, 0, 0, 0], DURATION=[2.0, 0, 0, 0]))
    assert both.dose_rate.tolist() == [[50.0], [0.0]]


def test_reset_epochs_and_cancelled_additional_doses():
    df = frame(ID=[1] * 7,
               TIME=[0.0, 2, 30, 31, 0, 1, 30],
               EVID=[1, 0, 3, 0, 4, 0, 0],
               AMT=[100.0, 0, 0, 0, 80, 0, 0],
               II=[12.0, 0, 0, 0, 0, 0, 0], ADDL=[4, 0, 0, 0, 0, 0, 0],
               DV=[np.nan, 5, np.nan, 0.5, np.nan, 4, 1])
    data = read_nonmem(df)
    # doses at 0, 12, 24 (36 and 48 come after the reset at 30: cancelled), then 0 (epoch 2)
    assert data.dose_time.tolist() == [[0.0, 12.0, 24.0, 0.0]]
    assert data.dose_epoch.tolist() == [[0, 0, 0, 2]]
    assert data.obs_time.tolist() == [[2.0, 31.0, 1.0, 30.0]]
    assert data.obs_epoch.tolist() == [[0, 1, 2, 2]]
    s = data.summary
    assert s["addl_cancelled"] == 2 and s["resets"] == 2
    assert s["excluded_reasons"] == {"EVID 3 (reset)": 1}
    assert s["doses"] == 4 and s["observations"] == 4


def test_blq_via_cens_limit_lloq_column_and_argument():
    df = frame(ID=[1] * 5, TIME=[0.0, 1, 2, 3, 4], EVID=[1, 0, 0, 0, 0],
               AMT=[10.0, 0, 0, 0, 0], DV=[np.nan, 5.0, 0.1, np.nan, 0.02],
               CENS=[0, 0, 1, 1, 0], LIMIT=[np.nan, np.nan, np.nan, 0.1, np.nan])
    data = read_nonmem(df)
    assert data.obs_blq.tolist() == [[False, True, True, False]]
    lloq = data.obs_lloq[0].tolist()
    assert math.isnan(lloq[0]) and lloq[1:3] == pytest.approx([0.1, 0.1]) and math.isnan(lloq[3])
    assert data.obs_dv[0, 2].item() == pytest.approx(0.1)     # DV missing: holds the limit
    with_arg = read_nonmem(df, lloq=0.05)                        # 0.02 < 0.05 is BLQ too
    assert with_arg.obs_blq.tolist() == [[False, True, True, True]]
    assert with_arg.obs_lloq[0, 3].item() == pytest.approx(0.05)
    assert with_arg.summary["blq"] == 3 and with_arg.summary["observations"] == 4

    col = frame(ID=[1] * 4, TIME=[0.0, 1, 2, 3], EVID=[1, 0, 0, 0], AMT=[10.0, 0, 0, 0],
                DV=[0.0, 2.0, 0.3, 0.0], LLOQ=[0.5] * 4, BLQ=[0, 0, 0, 1])
    data = read_nonmem(col)          # DV 0.3 < LLOQ; the flagged DV 0 is a placeholder
    assert data.obs_blq.tolist() == [[False, True, True]]
    assert data.obs_lloq[0, 1:].tolist() == [0.5, 0.5]


def test_time_varying_covariate_last_value_carried_forward():
    df = frame(ID=[1, 1, 1, 1, 1, 2, 2], TIME=[0.0, 1, 2, 3, 4, 0, 1],
               EVID=[1, 0, 2, 0, 0, 1, 0], AMT=[10.0, 0, 0, 0, 0, 10, 0],
               DV=[np.nan, 1, np.nan, 2, 3, np.nan, 4],
               CRCL=[60.0, np.nan, 40.0, np.nan, 30.0, 80.0, 80.0],
               FOOD=["fed", "fed", "fasted", "fasted", "fed", "fasted", "fasted"],
               WT=[70.0] * 5 + [50.0] * 2)
    data = read_nonmem(df, time_varying=["CRCL", "FOOD"])
    # obs at 1 (CRCL missing -> 60), 3 (missing -> 40 from the EVID 2 row), 4 (30)
    assert data.time_varying["CRCL"].tolist() == [[60.0, 40.0, 30.0], [80.0, 80.0, 80.0]]
    assert data.categories["FOOD"] == ["fasted", "fed"]
    assert data.time_varying["FOOD"].tolist() == [[1, 0, 1], [0, 0, 0]]
    assert data.covariates["WT"].tolist() == [70.0, 50.0] and list(data.covariates) == ["WT"]
    assert data.summary["excluded_reasons"] == {"EVID 2 (other event)": 1}
    # default: the varying numeric column is time-varying, the varying text is not read
    with pytest.warns(DataWarning, match=r"CRCL varies within a subject \(subject 1 at "
                      r"DataFrame index 2: 40 after 60\): read as time-varying.*FOOD not read"):
        auto = read_nonmem(df)
    assert len(auto.summary["notes"]) == 2 and "CRCL varies" in describe(auto)
    assert list(auto.time_varying) == ["CRCL"] and "FOOD" in auto.summary["ignored_columns"]
    assert "FOOD" not in auto.covariates
    # naming a varying column as a covariate gives its first value
    with pytest.warns(DataWarning, match="column FOOD not read"):
        base = read_nonmem(df, covariates=["CRCL"], categorical=None)
    assert base.covariates["CRCL"].tolist() == [60.0, 80.0] and "CRCL" not in base.time_varying


def test_numeric_categorical_and_numeric_dvid():
    df = frame(ID=[1, 1, 1, 2, 2], TIME=[0.0, 1, 1, 0, 2], EVID=[1, 0, 0, 1, 0],
               AMT=[5.0, 0, 0, 5, 0], DV=[0.0, 1, 50, 0, 2], DVID=[1, 2, 1, 1, 2],
               RACE=[3, 3, 3, 1, 1])
    data = read_nonmem(df, categorical=["RACE"])
    assert data.categories["RACE"] == [1, 3] and data.covariates["RACE"].tolist() == [1, 0]
    assert data.dvid_names == ["2", "1"]                         # first appearance among obs
    assert data.obs_dvid.tolist() == [[0, 1], [0, 0]] and data.obs_mask.tolist() == \
        [[True, True], [True, False]]


def test_mdv_only_and_amt_only_files():
    mdv = frame(ID=[1, 1, 1, 1], TIME=[0.0, 1, 2, 3], AMT=[100.0, 0, 0, 0],
                MDV=[1, 0, 1, 0], DV=[0.0, 5, np.nan, 3])
    data = read_nonmem(mdv)
    assert data.dose_amt.tolist() == [[100.0]] and data.obs_time.tolist() == [[1.0, 3.0]]
    assert data.summary["excluded_rows"] == 1
    assert list(data.summary["excluded_reasons"].values()) == [1]
    plain = read_nonmem(mdv.drop(columns="MDV").drop(index=2))
    assert plain.dose_amt.tolist() == [[100.0]] and plain.obs_dv.tolist() == [[5.0, 3.0]]


def test_evid0_with_mdv1_is_excluded_and_every_row_is_accounted_for():
    df = frame(ID=[1, 1, 1, 1, 1], TIME=[0.0, 1, 2, 3, 4], EVID=[1, 0, 0, 2, 0],
               MDV=[1, 0, 1, 1, 0], AMT=[10.0, 0, 0, 0, 0], DV=[0.0, 1, np.nan, np.nan, 2])
    s = read_nonmem(df).summary
    assert s["excluded_reasons"] == {"EVID 2 (other event)": 1,
                                     "EVID 0 with MDV 1 (no observation)": 1}
    assert s["dose_rows"] + s["observations"] + s["excluded_rows"] == s["rows"] == 5


def test_subjects_by_first_appearance_with_text_ids_and_padding():
    df = frame(ID=["s9", "s9", "a1", "a1", "a1"], TIME=[0.0, 1, 0, 1, 2],
               EVID=[1, 0, 1, 0, 0], AMT=[1.0, 0, 2, 0, 0], DV=[0.0, 7, 0, 8, 9], CMT=[1, 2, 1, 2, 3])
    data = read_nonmem(df)
    assert data.ids == ["s9", "a1"]
    assert data.obs_dv.tolist() == [[7.0, 0.0], [8.0, 9.0]]
    assert data.obs_time.tolist() == [[1.0, 1.0], [1.0, 2.0]]   # padded with the last time
    assert data.obs_cmt.tolist() == [[2, 2], [2, 3]]
    assert data.obs_mask.tolist() == [[True, False], [True, True]]
    assert data.obs_lloq[~data.obs_mask].isnan().all() and not data.obs_blq.any()


def test_large_file_reads_and_counts(tmp_path):
    rng = np.random.default_rng(0)
    S, per = 1000, 12
    evid = np.tile(np.r_[1, [0] * (per - 1)], S)
    df = frame(ID=np.repeat(np.arange(1, S + 1), per),
               TIME=np.tile(np.arange(per, dtype=float), S), EVID=evid,
               AMT=np.where(evid == 1, 100.0, 0), II=np.where(evid == 1, 24.0, 0),
               ADDL=np.where(evid == 1, 2, 0), DV=np.where(evid == 1, np.nan, 1.0),
               WT=np.repeat(rng.uniform(50, 90, S), per))
    df.to_csv(tmp_path / "big.csv", index=False, na_rep=".")
    data = read_nonmem(tmp_path / "big.csv")
    assert data.dose_time.shape == (S, 3) and data.obs_dv.shape == (S, per - 1)
    assert data.summary["doses"] == 3 * S and data.n_observations == S * (per - 1)
    np.testing.assert_allclose(data.covariates["WT"].double().numpy(),
                               df.groupby("ID").WT.first().to_numpy(), rtol=1e-6)


def test_describe_and_subset():
    data = read_nonmem(DATASETS / "warfarin.csv")
    text = describe(data)
    assert text.splitlines()[0] == "32 subjects, 32 doses, 483 observations (0 BLQ)"
    assert "cp (251)" in text and "pca (232)" in text and "sex [female/male]" in text
    two = data.subset([0, 1])
    assert two.n_subjects == 2 and two.covariates["wt"].shape == (2,)


# ---- malformed input: ValueError naming the row and the column ----------------------


def good():
    return frame(ID=[1, 1, 1, 2, 2, 2], TIME=[0.0, 1, 2, 0, 1, 2],
                 AMT=[100.0, 0, 0, 100, 0, 0], EVID=[1, 0, 0, 1, 0, 0],
                 MDV=[1, 0, 0, 1, 0, 0], DV=[0.0, 5, 4, 0, 6, 5], CMT=[1, 2, 2, 1, 2, 2],
                 RATE=[0.0] * 6, II=[0.0] * 6, ADDL=[0] * 6, SS=[0] * 6)


def put(column, row, value):
    def edit(df):
        df[column] = df[column].astype(object if isinstance(value, str) else float)
        df.loc[df.index[row], column] = value
        return df
    return edit


def both(*edits):
    def edit(df):
        for e in edits:
            df = e(df)
        return df
    return edit


MALFORMED = [
    # (id, edit, row position, column, problem)
    ("time-text", put("TIME", 2, "abc"), 2, "TIME", "not a number"),
    ("time-missing", put("TIME", 1, np.nan), 1, "TIME", "missing"),
    ("time-negative", put("TIME", 4, -1.0), 4, "TIME", "negative"),
    ("time-backwards", put("TIME", 2, 0.5), 2, "TIME", "backwards"),
    ("dv-text", put("DV", 4, "BLQ"), 4, "DV", "not a number"),
    ("dv-missing", put("DV", 5, np.nan), 5, "DV", "missing on an observation"),
    ("amt-text", put("AMT", 3, "ten"), 3, "AMT", "not a number"),
    ("amt-negative", put("AMT", 3, -5.0), 3, "AMT", "negative"),
    ("amt-zero-dose", put("AMT", 3, 0.0), 3, "AMT", "AMT is 0 on a dose row"),
    ("amt-on-observation", put("AMT", 1, 5.0), 1, "AMT", "not a dose"),
    ("id-missing", put("ID", 4, np.nan), 4, "ID", "missing"),
    ("id-not-contiguous", put("ID", 5, 1), 5, "ID", "contiguous"),
    ("evid-unknown", put("EVID", 1, 5), 1, "EVID", "not one of"),
    ("mdv-unknown", put("MDV", 2, 2), 2, "MDV", "0 or 1"),
    ("cmt-zero-dose", put("CMT", 3, 0), 3, "CMT", "positive integer"),
    ("cmt-fraction", put("CMT", 1, 1.5), 1, "CMT", "positive integer"),
    ("cmt-negative", put("CMT", 2, -1), 2, "CMT", "positive integer"),
    ("rate-negative", put("RATE", 3, -3.0), 3, "RATE", "negative"),
    ("rate-modelled-duration", put("RATE", 0, -2.0), 0, "RATE", "not supported"),
    ("rate-modelled-rate", put("RATE", 0, -1.0), 0, "RATE", "not supported"),
    ("addl-without-ii", put("ADDL", 3, 2), 3, "II", "ADDL is 2"),
    ("ss-without-ii", put("SS", 0, 1), 0, "II", "steady-state dose needs II > 0"),
    ("ii-negative", put("II", 0, -12.0), 0, "II", "negative"),
    ("addl-negative", both(put("II", 0, 12.0), put("ADDL", 0, -1)), 0, "ADDL", "negative"),
    ("addl-fraction", both(put("II", 0, 12.0), put("ADDL", 0, 1.5)), 0, "ADDL", "whole"),
    ("ss-infusion-addl", both(put("II", 0, 12.0), put("ADDL", 0, 2), put("SS", 0, 1),
                              put("RATE", 0, 10.0)), 0, "ADDL", "steady-state infusion"),
]


@pytest.mark.parametrize("edit,pos,column,problem",
                         [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
@pytest.mark.parametrize("kind", ["frame", "file"])
def test_malformed_row_names_row_and_column(kind, edit, pos, column, problem, tmp_path):
    df = edit(good())
    if kind == "file":
        path = tmp_path / "bad.csv"
        df.to_csv(path, index=False)
        source, where = path, rf"bad\.csv row {pos + 1}, "
    else:
        df.index = pd.Index([100 + 7 * k for k in range(len(df))])   # labels, not positions
        source, where = df, rf"DataFrame index {100 + 7 * pos}, "
    with pytest.raises(ValueError, match=rf"{where}column {column}: .*{problem}"):
        read_nonmem(source)


def test_duration_and_censoring_errors():
    base = good()
    with pytest.raises(ValueError, match=r"index 0, column DUR: .*negative"):
        read_nonmem(base.assign(DUR=[-1.0, 0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"index 0, column DUR: RATE 10 and DUR 2 disagree"):
        read_nonmem(base.assign(DUR=[2.0, 0, 0, 0, 0, 0], RATE=[10.0, 0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"index 2, column CENS: .*not supported"):
        read_nonmem(base.assign(CENS=[0, 0, -1, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"index 2, column CENS: .*must be 0 or 1"):
        read_nonmem(base.assign(CENS=[0, 0, 2, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"index 2, column DV: .*no limit"):
        read_nonmem(base.assign(CENS=[0, 0, 1, 0, 0, 0], DV=[0, 5, np.nan, 0, 6, 5]))
    with pytest.raises(ValueError, match=r"index 2, column LIMIT: .*interval censoring"):
        read_nonmem(base.assign(CENS=[0, 0, 1, 0, 0, 0], LIMIT=[np.nan, np.nan, 1.0] + [np.nan] * 3))
    # a DV missing on an observation row is fine when it is flagged BLQ with a limit
    ok = read_nonmem(base.assign(CENS=[0, 0, 1, 0, 0, 0], DV=[0, 5, np.nan, 0, 6, 5]), lloq=0.5)
    assert ok.obs_blq.tolist() == [[False, True], [False, False]]


@pytest.mark.parametrize("drop", ["ID", "TIME", "DV", "AMT"])
def test_missing_required_column(drop):
    with pytest.raises(ValueError, match=rf"\b{drop}\b"):
        read_nonmem(good().drop(columns=drop))


def test_missing_columns_name_the_row_where_they_are_needed(tmp_path):
    df = good().drop(columns="AMT")
    df.to_csv(tmp_path / "noamt.csv", index=False)
    with pytest.raises(ValueError, match=r"noamt\.csv row 1, column EVID: .*no AMT column"):
        read_nonmem(tmp_path / "noamt.csv")
    with pytest.raises(ValueError, match=r"index 1, column DV: .*no DV column"):
        read_nonmem(good().drop(columns="DV"))
    doses_only = good().iloc[[0, 3]].drop(columns="DV")          # no observations: DV optional
    assert read_nonmem(doses_only).obs_time.shape == (2, 0)
    with pytest.raises(ValueError, match="required column ID"):
        read_nonmem(good().drop(columns="ID"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="covariates: no column 'HEIGHT'"):
        read_nonmem(good(), covariates=["HEIGHT"])
    with pytest.raises(ValueError, match="NONMEM data item"):
        read_nonmem(good(), time_varying=["DV"])
    with pytest.raises(ValueError, match="categorical: 'X' is not read"):
        read_nonmem(good().assign(X=1), categorical=["X"], covariates=[])
    with pytest.raises(TypeError, match="lloq must be a number"):
        read_nonmem(good(), lloq="0.1")
    with pytest.raises(TypeError, match="path or a pandas DataFrame"):
        read_nonmem(42)
    with pytest.raises(ValueError, match="same name"):
        read_nonmem(good().assign(dv=1.0))


# ---- the same data, written differently: every variant reads the same tensors ---------


def _variant(kind, text):
    lines = text.splitlines()
    if kind == "utf-16":
        return text.encode("utf-16")
    if kind == "utf-8-bom":
        return text.encode("utf-8-sig")
    if kind == "crlf":
        return text.replace("\n", "\r\n").encode()
    if kind == "whitespace":
        return "\n".join("  ".join(ln.split(",")) for ln in lines).encode() + b"\n"
    if kind == "quoted":
        return "\n".join(",".join(f'"{f}"' for f in ln.split(",")) for ln in lines).encode()
    if kind == "comments":   # NONMEM comment rows of the three kinds, and a blank line
        body = [lines[0], "C,a comment row", *lines[1:5], "# another", "", "@x", *lines[5:]]
        return ("# theophylline (a comment before the header)\n" + "\n".join(body)).encode()
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["utf-16", "utf-8-bom", "crlf", "whitespace", "quoted",
                                  "comments"])
def test_file_variants_read_the_same(kind, tmp_path):
    text = (DATASETS / "theo_sd.csv").read_text()
    ref = read_nonmem(DATASETS / "theo_sd.csv")
    path = tmp_path / "variant.csv"
    path.write_bytes(_variant(kind, text))
    if kind == "comments":
        with pytest.warns(DataWarning, match=r"4 comment rows skipped .*lines 1, 3, 8, 10"):
            data = read_nonmem(path)
    else:
        data = read_nonmem(path)
    assert data.ids == ref.ids
    for name in ("dose_time", "dose_amt", "dose_cmt", "obs_time", "obs_dv", "obs_cmt",
                 "obs_mask", "dose_mask"):
        assert torch.equal(getattr(data, name), getattr(ref, name)), name
    assert torch.equal(data.covariates["WT"], ref.covariates["WT"])
