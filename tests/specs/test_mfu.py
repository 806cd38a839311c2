"""calib.specs.mfu: import and validation, every branch of both lookup rules, the spec §7 numbers."""

from __future__ import annotations

import argparse
import json
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calib.commands import import_mfu as cmd
from calib.errors import ConfigError
from calib.specs.mfu import (
    MFU_FORMAT,
    MFU_RULES,
    DecodeTable,
    GemmTable,
    MFUDatabase,
    PrefillTable,
    import_bench_data,
    load_mfu,
)

ZERO = 1e-4

# --------------------------------------------------------------------------- toy bench_data

# (m, k, n, mfu) in file order.  (100,300) and (300,100) tie for a (100,100) query;
# (200,400) has a zero at m=8; (50,50) is the last row's pair.
GEMM = [
    (8, 100, 300, 0.1), (16, 100, 300, 0.2), (32, 100, 300, 0.4),
    (8, 300, 100, 0.15), (16, 300, 100, 0.25), (32, 300, 100, 0.45),
    (8, 200, 400, 0.0), (16, 200, 400, 0.3), (32, 200, 400, 0.5),
    (8, 50, 50, 0.05), (64, 50, 50, 0.6),
]
PREFILL = {
    "8-8-64": [(4096, 0.4), (1024, 0.0), (2048, 0.2), (8192, 0.6)],  # deliberately not sorted
    "16-4-64": [(1024, 0.3), (2048, 0.5)],
    "4-4-64": [(3000, 0.7), (2000, 0.0), (1000, 0.5)],  # zero row equidistant from two non-zero rows
}
# bs axis {1, 4, 8}, kv axis {100, 200, 400}; the (4, 400) cell is absent.
DECODE_TP1 = [(1, 100, 0.0), (1, 200, 0.0), (1, 400, 0.01), (4, 100, 0.02), (4, 200, 0.04),
              (8, 100, 0.08), (8, 200, 0.1), (8, 400, 0.2)]
DECODE = {
    ("8-8-64", 1): DECODE_TP1,
    ("8-8-64", 4): [(bs, kv, 2 * m) for bs, kv, m in DECODE_TP1],
    ("16-4-64", 2): [(1, 100, 0.3)],
    ("16-4-64", 4): [(1, 100, 0.6)],
}


def write_bench(root: Path, gemm=GEMM, prefill=PREFILL, decode=DECODE, gpu="Toy") -> Path:
    """Write a bench_data tree with the raw InferSim column layout (extra columns included)."""
    def write(path: Path, header: str, lines):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join([header, *lines]) + "\n")

    write(root / "gemm" / gpu / "data.csv", "m,k,n,latency_us,mfu", [f"{m},{k},{n},1.5,{u}" for m, k, n, u in gemm])
    for key, rows in prefill.items():
        write(root / "mha" / "prefill" / gpu / f"{key}.csv", "dtype,seq_len,latency_us,mfu",
              [f"bf16,{s},2.0,{u}" for s, u in rows])
    for (key, tp), rows in decode.items():
        write(root / "mha" / "decode" / gpu / f"{key}-tp{tp}.csv", "dtype,kv_dtype,batch_size,kv_len,latency_us,mfu",
              [f"bf16,bf16,{b},{kv},3.0,{u}" for b, kv, u in rows])
    return root


@pytest.fixture
def toy(tmp_path) -> MFUDatabase:
    return import_bench_data(write_bench(tmp_path / "bench_data"), "toy")


@pytest.fixture(scope="session")
def bench_dir(shared_data) -> Path:
    return shared_data / "bench_data"


def lookup(f, *args, **kw) -> list[float]:
    return np.round(np.asarray(f(*args, **kw), dtype=float), 9).ravel().tolist()


# --------------------------------------------------------------------------- GEMM


def test_gemm_stage1_tie_goes_to_first_pair_in_file_order(toy):
    # (100,300) and (300,100) are both at distance 200 from (100,100): (100,300) comes first
    assert lookup(toy.gemm_mfu, 16, 100, 100) == [0.2]
    assert lookup(toy.gemm_mfu, 12, 100, 100, rule="interp") == [0.15]
    assert lookup(toy.gemm_mfu, 16, 300, 100) == [0.25]  # exact pair


def test_gemm_no_pair_qualifies(toy):
    # nearest: (k, n) of the last file row = (50, 50); interp: largest k²+n² = (200, 400)
    assert lookup(toy.gemm_mfu, [10, 64, 1000], 400, 400) == [0.05, 0.6, 0.6]
    assert lookup(toy.gemm_mfu, [24, 32], 400, 400, rule="interp") == [0.4, 0.5]


def test_gemm_interp_largest_magnitude_tie_goes_to_first_in_file_order(tmp_path):
    db = import_bench_data(write_bench(tmp_path, gemm=GEMM[:6]), "toy")
    assert lookup(db.gemm_mfu, 32, 400, 400, rule="interp") == [0.4]  # (100,300), not (300,100)


def test_gemm_stage2_nearest_floor_and_below_smallest_m(toy):
    assert lookup(toy.gemm_mfu, [1, 4, 8, 20, 32, 1000], 100, 300) == [0.1, 0.1, 0.1, 0.2, 0.4, 0.4]


def test_gemm_stage2_interp_linear_and_clamped(toy):
    got = lookup(toy.gemm_mfu, [1, 8, 20, 24, 1000], 100, 300, rule="interp")
    assert got == pytest.approx([0.1, 0.1, 0.25, 0.3, 0.4])


def test_gemm_zero_fallbacks(toy):
    # (190,390) -> (200,400), whose m=8 row is 0
    assert lookup(toy.gemm_mfu, [4, 8, 9], 190, 390) == [0.1, 0.1, 0.1]  # first non-zero row of the file
    # interp: row nearest in (m,k,n) among non-zero rows is (16,200,400)
    assert lookup(toy.gemm_mfu, [4, 8], 190, 390, rule="interp") == [0.3, 0.3]
    # a small but >= 1e-4 interpolated value is kept
    assert lookup(toy.gemm_mfu, 8.01, 190, 390, rule="interp") == pytest.approx([0.3 * 0.01 / 8])


# --------------------------------------------------------------------------- prefill


def test_prefill_nearest_floor_preferring_and_zero_fallback(toy):
    seq = [512, 1024, 1500, 2048, 3500, 4096, 9000]
    # 3500: floor 2048 wins over the closer 4096; 512/1024/1500 land on the zero 1024 row -> 2048
    assert lookup(toy.prefill_mfu, "8-8-64", seq) == [0.2, 0.2, 0.2, 0.2, 0.2, 0.4, 0.6]


def test_prefill_interp_linear_clamped_and_zero_fallback(toy):
    got = lookup(toy.prefill_mfu, "8-8-64", [512, 1024, 1100, 3072, 6144, 9000], rule="interp")
    assert got == pytest.approx([0.2, 0.2, 0.2 * 76 / 1024, 0.3, 0.5, 0.6])


def test_prefill_zero_fallback_tie_goes_to_first_in_file_order(toy):
    for rule in MFU_RULES:
        assert lookup(toy.prefill_mfu, "4-4-64", 2000, rule=rule) == [0.7]


def test_attention_key(toy):
    assert toy.attention_key(8, 8, 64) == "8-8-64"
    assert toy.attention_key(100, 1, 64) == "16-4-64"
    assert toy.attention_key(12, 6, 64) == "16-4-64"  # tie with 8-8-64: first in sorted key order
    with pytest.raises(ConfigError) as err:
        toy.attention_key(0, 8, 64)
    assert err.value.field == "n_heads"


# --------------------------------------------------------------------------- decode


def test_decode_nearest(toy):
    key = "8-8-64"
    assert lookup(toy.decode_mfu, key, 1, 5, 390) == [0.04]  # floor (4,200) beats the closer (8,400)
    assert lookup(toy.decode_mfu, key, 1, 6, 50) == [0.02]  # no floor row: (4,100)/(8,100) tie -> first
    assert lookup(toy.decode_mfu, key, 1, 1, 200) == [0.04]  # zero row -> nearest non-zero (4,200)
    assert lookup(toy.decode_mfu, key, 1, 3, 390) == [0.01]  # floor (1,200) is zero -> (1,400)
    assert lookup(toy.decode_mfu, key, 1, 100, 100000) == [0.2]
    out = toy.decode_mfu(key, 1, [[1], [8]], [100, 400])  # broadcasting
    assert out.shape == (2, 2) and np.round(out, 9).tolist() == [[0.02, 0.01], [0.08, 0.2]]


def test_decode_interp(toy):
    key, f = "8-8-64", lambda bs, kv: lookup(toy.decode_mfu, key, 1, bs, kv, rule="interp")
    assert f(6, 150) == pytest.approx([0.06])
    assert f(6, 300) == pytest.approx([0.085])  # the absent (4,400) cell counts as 0
    assert f(4, 300) == pytest.approx([0.02])
    assert f(100, 1000) == [0.2]  # clamped at both maxima
    assert f(2, 50) == pytest.approx([0.02 / 3])  # kv clamped to 100, bs interpolated
    assert f(1, 300) == pytest.approx([0.005])  # small but >= 1e-4: kept
    assert f(4, 200) == [0.04]  # exact grid point
    assert f(1, 150) == [0.02]  # 0 -> fallback; (4,100)/(4,200) tie -> first in file order
    assert f(4, 400) == [0.01]  # absent cell, exact hit -> 0 -> nearest non-zero (1,400)


def test_decode_tp_fallback(toy):
    f = lambda tp, **kw: lookup(toy.decode_mfu, "8-8-64", tp, 8, 400, **kw)  # noqa: E731
    assert f(3, tp_fallback="tp1") == [0.2]
    assert f(3, tp_fallback="nearest") == [0.4]
    assert f(2, tp_fallback="nearest") == [0.2]
    assert f(4, tp_fallback="tp1") == [0.4]  # an existing table is always used
    assert f(3) == [0.2]  # nearest rule defaults to tp1
    assert f(3, rule="interp") == [0.4]  # interp rule defaults to nearest TP
    assert lookup(toy.decode_mfu, "16-4-64", 3, 1, 100, tp_fallback="nearest") == [0.3]  # tie -> smaller TP
    with pytest.raises(ConfigError) as err:
        toy.decode_mfu("16-4-64", 3, 1, 100, tp_fallback="tp1")
    assert err.value.field == "tp"
    with pytest.raises(ConfigError) as err:
        toy.decode_mfu("8-8-64", 3, 1, 100, tp_fallback="tp8")
    assert err.value.field == "tp_fallback"


def test_unknown_rule_and_key(toy):
    for call in (lambda: toy.gemm_mfu(8, 1, 1, rule="linear"),
                 lambda: toy.prefill_mfu("8-8-64", 8, rule="linear"),
                 lambda: toy.decode_mfu("8-8-64", 1, 1, 1, rule="linear")):
        with pytest.raises(ConfigError) as err:
            call()
        assert err.value.field == "rule"
    for call in (lambda: toy.prefill_mfu("9-9-9", 8), lambda: toy.decode_mfu("9-9-9", 1, 1, 1)):
        with pytest.raises(ConfigError) as err:
            call()
        assert err.value.field == "key"


# --------------------------------------------------------------------------- spec §7 on the embedded H100 table


@pytest.mark.parametrize("rule", MFU_RULES)
def test_spec_gemm_numbers(mfu_h100, rule):
    shapes = [(4096, 4096), (4096, 11008), (11008, 4096)]
    assert [float(mfu_h100.gemm_mfu(1, k, n, rule)) for k, n in shapes] == [0.013, 0.015, 0.017]
    assert [float(mfu_h100.gemm_mfu(512, k, n, rule)) for k, n in shapes] == [0.495, 0.521, 0.553]


@pytest.mark.parametrize("rule", MFU_RULES)
def test_spec_prefill_512(mfu_h100, rule):
    assert float(mfu_h100.prefill_mfu("32-32-128", 512, rule)) == 0.224


def test_spec_decode_numbers(mfu_h100):
    key = mfu_h100.attention_key(32, 32, 128)
    assert key == "32-32-128"
    assert float(mfu_h100.decode_mfu(key, 1, 1, 1000)) == 0.001  # (1,512) is 0 -> (1,1024)
    assert float(mfu_h100.decode_mfu(key, 1, 1, 1000, rule="interp")) == pytest.approx(0.000953, abs=1e-6)
    assert lookup(mfu_h100.decode_mfu, key, 1, 1, [512, 513, 514]) == [0.003] * 3  # §7.5: -> (16,512)


def test_spec_attention_keys_and_tp(mfu_h100):
    assert mfu_h100.attention_key(40, 8, 128) == "32-8-128"
    assert mfu_h100.attention_key(64, 8, 128) == "64-8-128"
    assert mfu_h100.decode_table("32-32-128", 8, "nearest") is mfu_h100.decode[("32-32-128", 4)]
    assert mfu_h100.decode_table("32-32-128", 8, "tp1") is mfu_h100.decode[("32-32-128", 1)]


def test_many_lookups_are_fast(mfu_h100):
    rng = np.random.default_rng(0)
    m, bs, kv = rng.integers(1, 200_000, 100_000), rng.integers(1, 600, 100_000), rng.integers(1, 140_000, 100_000)
    for rule in MFU_RULES:
        start = time.perf_counter()
        mfu_h100.gemm_mfu(m, 4096, 11008, rule)
        mfu_h100.prefill_mfu("32-32-128", kv, rule)
        mfu_h100.decode_mfu("32-32-128", 1, bs, kv, rule)
        assert time.perf_counter() - start < 1.0  # typically ~50 ms for all three


# --------------------------------------------------------------------------- import, JSON, load_mfu


def assert_same(a: MFUDatabase, b: MFUDatabase):
    assert a.gpu == b.gpu and list(a.prefill) == list(b.prefill) and list(a.decode) == list(b.decode)
    pairs = [(a.gemm, b.gemm)] + [(a.prefill[k], b.prefill[k]) for k in a.prefill]
    pairs += [(a.decode[k], b.decode[k]) for k in a.decode]
    for x, y in pairs:
        for name in vars(x):
            if name != "grid":
                assert getattr(x, name).dtype == getattr(y, name).dtype
                np.testing.assert_array_equal(getattr(x, name), getattr(y, name))


def test_round_trip_and_deterministic_bytes(tmp_path):
    bench = write_bench(tmp_path / "bench_data")
    a = import_bench_data(bench, "TOY", tmp_path / "a.json")
    import_bench_data(bench, "toy", tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["format"] == MFU_FORMAT and doc["gpu"] == "toy" and "source" in doc
    assert doc["gemm"]["m"][:3] == [8, 16, 32]  # file order kept
    assert doc["prefill"]["8-8-64"]["seq_len"] == [4096, 1024, 2048, 8192]
    b = load_mfu(tmp_path / "a.json")
    assert_same(a, b)
    assert b.source == str(tmp_path / "a.json")
    assert_same(a, load_mfu(str(bench)))  # raw directory, single GPU
    assert_same(a, pickle.loads(pickle.dumps(b)))


def test_embedded_h100_matches_bench_data(bench_dir, mfu_h100, tmp_path):
    db = import_bench_data(bench_dir, "h100", tmp_path / "h100.json")
    assert (tmp_path / "h100.json").read_bytes() == Path(mfu_h100.source).read_bytes()
    assert_same(db, mfu_h100)
    assert len(db.gemm.m) == 112 and len(db.prefill) == 6 and len(db.decode) == 18
    assert db.gemm.k[-1] == 8192 and db.gemm.n[-1] == 11008 and db.gemm.m[-1] == 131072


def test_load_mfu_names(tmp_path):
    assert load_mfu("H100").gpu == "h100"
    with pytest.raises(ConfigError, match="h100") as err:
        load_mfu("a100-unknown")
    assert err.value.field == "gpu"
    with pytest.raises(ConfigError, match="file not found"):
        load_mfu(tmp_path / "missing.json")
    bench = write_bench(tmp_path / "bench_data")
    write_bench(bench, gpu="Other")
    with pytest.raises(ConfigError, match="Other") as err:
        load_mfu(bench)
    assert err.value.field == "gpu"
    assert load_mfu(bench, gpu="other").gpu == "other"


def test_cli_import_mfu(tmp_path, capsys, monkeypatch):
    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers(dest="command"))
    bench = write_bench(tmp_path / "bench_data")
    monkeypatch.chdir(tmp_path)  # the default output is relative to the current folder, never the package
    args = parser.parse_args(["import-mfu", str(bench), "--gpu", "Toy"])
    assert args.func(args) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "gemm 11" in line and "8-8-64-tp1:8" in line
    assert load_mfu(tmp_path / "configs" / "mfu" / "toy.json").gpu == "toy"
    args = parser.parse_args(["import-mfu", str(bench), "--gpu", "toy", "--out", str(tmp_path / "x.json")])
    args.func(args)
    assert (tmp_path / "x.json").is_file()


# --------------------------------------------------------------------------- validation


def _csv(root: Path, rel: str) -> Path:
    return root / rel.replace("GPU", "Toy")


GEMM_CSV, PREFILL_CSV, DECODE_CSV = "gemm/GPU/data.csv", "mha/prefill/GPU/8-8-64.csv", "mha/decode/GPU/8-8-64-tp1.csv"


@pytest.mark.parametrize(
    "rel, old, new, field, message",
    [
        (GEMM_CSV, "m,k,n,latency_us,mfu", "m,k,n,latency_us,util", "mfu", "missing column"),
        (PREFILL_CSV, "dtype,seq_len", "dtype,seqlen", "seq_len", "missing column"),
        (DECODE_CSV, "bf16,bf16,1,200,", "bf16,bf16,1,abc,", "kv_len", "line 3"),
        (GEMM_CSV, "16,100,300,1.5,0.2", "16,100,300,1.5,nan", "mfu", "line 3"),
        (GEMM_CSV, "16,100,300,1.5,0.2", "16,100,300,1.5,", "mfu", "number"),
        (GEMM_CSV, "16,100,300,1.5,0.2", "16,100,300,1.5,1.5", "mfu", "[0, 1]"),
        (DECODE_CSV, "bf16,bf16,8,400,3.0,0.2", "bf16,bf16,8,400,3.0,-0.2", "mfu", "[0, 1]"),
        (GEMM_CSV, "16,100,300,1.5,0.2", "0,100,300,1.5,0.2", "m", "positive integer"),
        (GEMM_CSV, "16,100,300,1.5,0.2", "16,-100,300,1.5,0.2", "k", "positive integer"),
        (GEMM_CSV, "16,100,300,1.5,0.2", "16,100,0,1.5,0.2", "n", "positive integer"),
        (PREFILL_CSV, "bf16,2048,", "bf16,-2048,", "seq_len", "positive integer"),
        (DECODE_CSV, "bf16,bf16,4,100,", "bf16,bf16,0,100,", "batch_size", "positive integer"),
        (DECODE_CSV, "bf16,bf16,4,100,", "bf16,bf16,4,100.5,", "kv_len", "positive integer"),
        (DECODE_CSV, "bf16,bf16,4,100,", "bf16,bf16,4,200,", "kv_len", "duplicate"),
    ],
)
def test_bad_csv_names_file_and_column(tmp_path, rel, old, new, field, message):
    bench = write_bench(tmp_path / "bench_data")
    path = _csv(bench, rel)
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError, match=message) as err:
        import_bench_data(bench, "toy")
    assert err.value.file == str(path) and err.value.field == field
    assert str(path) in str(err.value) and field in str(err.value)


def test_bad_tables_and_dirs(tmp_path):
    bench = write_bench(tmp_path / "bench_data")
    with pytest.raises(ConfigError, match="no rows") as err:  # header only
        _csv(bench, PREFILL_CSV).write_text("dtype,seq_len,latency_us,mfu\n")
        import_bench_data(bench, "toy")
    assert err.value.file == str(_csv(bench, PREFILL_CSV))
    bench = write_bench(tmp_path / "b2", prefill={"8-8-64": [(1024, 0.0), (2048, 0.0)]})
    with pytest.raises(ConfigError, match="every mfu") as err:
        import_bench_data(bench, "toy")
    assert err.value.field == "mfu"
    bench = write_bench(tmp_path / "b3")
    (bench / "mha" / "decode" / "Toy" / "8-8-64.csv").write_text("x\n")
    with pytest.raises(ConfigError) as err:
        import_bench_data(bench, "toy")
    assert err.value.field == "file name"
    bench = write_bench(tmp_path / "b4")
    _csv(bench, GEMM_CSV).unlink()
    with pytest.raises(ConfigError, match="file not found") as err:
        import_bench_data(bench, "toy")
    assert err.value.file == str(_csv(bench, GEMM_CSV))
    with pytest.raises(ConfigError, match="available: Toy") as err:
        import_bench_data(bench, "a100")
    assert err.value.field == "gpu"
    with pytest.raises(ConfigError, match="not found"):
        import_bench_data(tmp_path / "nowhere", "toy")


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda d: d.update(format="calib-mfu/0"), "format"),
        (lambda d: d.pop("format"), "format"),
        (lambda d: d["gemm"]["mfu"].__setitem__(0, "0.1"), "gemm.mfu"),
        (lambda d: d["decode"]["8-8-64-tp1"].pop("kv_len"), "decode.8-8-64-tp1.kv_len"),
        (lambda d: d["prefill"]["8-8-64"]["seq_len"].append(1), "prefill.8-8-64"),
        (lambda d: d["decode"].update({"8-8-64-tp0": d["decode"]["8-8-64-tp1"]}), "decode.8-8-64-tp0"),
        (lambda d: d.update(prefill={}), "prefill"),
    ],
)
def test_bad_json_names_file_and_field(tmp_path, edit, field):
    out = tmp_path / "toy.json"
    import_bench_data(write_bench(tmp_path / "bench_data"), "toy", out)
    doc = json.loads(out.read_text())
    edit(doc)
    out.write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as err:
        load_mfu(out)
    assert err.value.file == str(out) and err.value.field == field


def test_json_not_json(tmp_path):
    (tmp_path / "x.json").write_text("{nope")
    with pytest.raises(ConfigError, match="cannot read JSON"):
        load_mfu(tmp_path / "x.json")


# --------------------------------------------------------------------------- property tests


def _all_decode(db):
    return sorted(db.decode)


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_interp_stays_within_table_range(mfu_h100, data):
    """Interpolation never leaves [lower, max mfu] of the table it used.

    The lower bound is the smallest non-zero mfu for GEMM and prefill (all
    their rows are non-zero); for decode it is the 1e-4 zero threshold, because
    bilinear weights against a zero or absent cell may legitimately give less
    than the smallest non-zero row (spec §7.2: 0.000953 < 0.001).
    """
    db = mfu_h100
    m = np.array(data.draw(st.lists(st.integers(1, 300_000), min_size=1, max_size=20)))
    k, n = data.draw(st.integers(1, 20_000)), data.draw(st.integers(1, 20_000))
    g = db.gemm.mfu
    got = db.gemm_mfu(m, k, n, "interp")
    assert np.all(got >= g[g >= ZERO].min()) and np.all(got <= g.max())
    key = data.draw(st.sampled_from(sorted(db.prefill)))
    p = db.prefill[key].mfu
    got = db.prefill_mfu(key, m, "interp")
    assert np.all(got >= p[p >= ZERO].min()) and np.all(got <= p.max())
    key, tp = data.draw(st.sampled_from(_all_decode(db)))
    bs = np.array(data.draw(st.lists(st.integers(1, 700), min_size=len(m), max_size=len(m))))
    got = db.decode_mfu(key, tp, bs, m, "interp")
    assert np.all(got >= ZERO) and np.all(got <= db.decode[(key, tp)].mfu.max())


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_nearest_returns_a_table_value(mfu_h100, data):
    db = mfu_h100
    m = np.array(data.draw(st.lists(st.integers(1, 300_000), min_size=1, max_size=20)))
    k, n = data.draw(st.integers(1, 20_000)), data.draw(st.integers(1, 20_000))
    assert np.isin(db.gemm_mfu(m, k, n), db.gemm.mfu).all()
    key = data.draw(st.sampled_from(sorted(db.prefill)))
    assert np.isin(db.prefill_mfu(key, m), db.prefill[key].mfu).all()
    key, tp = data.draw(st.sampled_from(_all_decode(db)))
    bs = np.array(data.draw(st.lists(st.integers(1, 700), min_size=len(m), max_size=len(m))))
    got = db.decode_mfu(key, tp, bs, m)
    assert np.isin(got, db.decode[(key, tp)].mfu).all() and np.all(got >= ZERO)


# Reference implementations: a plain loop per query, written from the spec's wording.
# Python's min()/max() keep the first of equal items, i.e. file order.
def bracket(axis, x):
    axis = sorted(set(axis))
    if x <= axis[0]:
        return axis[0], axis[0], 0.0
    if x >= axis[-1]:
        return axis[-1], axis[-1], 0.0
    if x in axis:
        return x, x, 0.0
    lo, hi = max(a for a in axis if a < x), min(a for a in axis if a > x)
    return lo, hi, (x - lo) / (hi - lo)


def ref_gemm(rows, m, k, n, rule):
    pairs = list(dict.fromkeys((r[1], r[2]) for r in rows))
    fits = [p for p in pairs if p[0] >= k and p[1] >= n]
    if fits:
        kn = min(fits, key=lambda p: (p[0] - k) ** 2 + (p[1] - n) ** 2)
    elif rule == "nearest":
        kn = rows[-1][1:3]
    else:
        kn = max(pairs, key=lambda p: p[0] ** 2 + p[1] ** 2)
    pts = dict((r[0], r[3]) for r in rows if (r[1], r[2]) == kn)
    if rule == "nearest":
        below = [x for x in pts if x <= m]
        value = pts[max(below) if below else min(pts)]
    else:
        lo, hi, t = bracket(pts, m)
        value = pts[lo] + (pts[hi] - pts[lo]) * t
    if value < ZERO:
        nonzero = [r for r in rows if r[3] >= ZERO]
        if rule == "nearest":
            value = nonzero[0][3]
        else:
            value = min(nonzero, key=lambda r: (r[0] - m) ** 2 + (r[1] - k) ** 2 + (r[2] - n) ** 2)[3]
    return value


def ref_prefill(rows, seq, rule):
    pts = dict(rows)
    if rule == "nearest":
        below = [x for x in pts if x <= seq]
        value = pts[max(below) if below else min(pts)]
    else:
        lo, hi, t = bracket(pts, seq)
        value = pts[lo] + (pts[hi] - pts[lo]) * t
    if value < ZERO:
        value = min((r for r in rows if r[1] >= ZERO), key=lambda r: abs(r[0] - seq))[1]
    return value


def ref_decode(rows, bs, kv, rule):
    d2 = lambda r: (r[0] - bs) ** 2 + (r[1] - kv) ** 2  # noqa: E731
    if rule == "nearest":
        floor = [r for r in rows if r[0] <= bs and r[1] <= kv]
        value = min(floor or rows, key=d2)[2]
    else:
        grid = {(r[0], r[1]): r[2] for r in rows}
        q = lambda b, k: grid.get((b, k), 0.0)  # noqa: E731
        b0, b1, tb = bracket([r[0] for r in rows], bs)
        k0, k1, tk = bracket([r[1] for r in rows], kv)
        top = q(b0, k0) + (q(b1, k0) - q(b0, k0)) * tb
        bottom = q(b0, k1) + (q(b1, k1) - q(b0, k1)) * tb
        value = top + (bottom - top) * tk
    if value < ZERO:
        value = min((r for r in rows if r[2] >= ZERO), key=d2)[2]
    return value


MFUS = st.sampled_from([0.0, 0.0, 0.001, 0.003, 0.2, 0.5, 1.0])
gemm_rows = st.lists(
    st.tuples(st.sampled_from([8, 16, 64, 512]), st.sampled_from([64, 128, 256]), st.sampled_from([64, 128, 256]), MFUS),
    min_size=1, max_size=30, unique_by=lambda r: r[:3],
).filter(lambda rows: any(r[3] >= ZERO for r in rows))
prefill_rows = st.lists(st.tuples(st.sampled_from([256, 512, 1000, 1024, 4096]), MFUS),
                        min_size=1, max_size=5, unique_by=lambda r: r[0]).filter(lambda rows: any(r[1] >= ZERO for r in rows))
decode_rows = st.lists(
    st.tuples(st.sampled_from([1, 2, 4, 16, 64]), st.sampled_from([100, 256, 512, 1000, 4096]), MFUS),
    min_size=1, max_size=25, unique_by=lambda r: (r[0], r[1]),
).filter(lambda rows: any(r[2] >= ZERO for r in rows))


def toy_db(gemm=((8, 1, 1, 0.5),), prefill=((1, 0.5),), decode=((1, 1, 0.5),)) -> MFUDatabase:
    return MFUDatabase("t", GemmTable(*zip(*gemm)), {"1-1-1": PrefillTable(*zip(*prefill))},
                       {("1-1-1", 1): DecodeTable(*zip(*decode))}, "memory")


@settings(max_examples=50, deadline=None)
@given(rows=gemm_rows, k=st.integers(1, 300), n=st.integers(1, 300), m=st.lists(st.integers(0, 700), min_size=1, max_size=30))
def test_gemm_matches_reference_loop(rows, k, n, m):
    db = toy_db(gemm=rows)
    for rule in MFU_RULES:
        want = [ref_gemm(rows, x, k, n, rule) for x in m]
        np.testing.assert_allclose(db.gemm_mfu(m, k, n, rule), want, rtol=1e-12, atol=0)


@settings(max_examples=50, deadline=None)
@given(rows=prefill_rows, seq=st.lists(st.integers(0, 5000), min_size=1, max_size=30))
def test_prefill_matches_reference_loop(rows, seq):
    db = toy_db(prefill=rows)
    for rule in MFU_RULES:
        want = [ref_prefill(rows, x, rule) for x in seq]
        np.testing.assert_allclose(db.prefill_mfu("1-1-1", seq, rule), want, rtol=1e-12, atol=0)


@settings(max_examples=50, deadline=None)
@given(rows=decode_rows, queries=st.lists(st.tuples(st.integers(0, 80), st.integers(0, 5000)), min_size=1, max_size=30))
def test_decode_matches_reference_loop(rows, queries):
    db = toy_db(decode=rows)
    bs, kv = (np.array(c) for c in zip(*queries))
    for rule in MFU_RULES:
        want = [ref_decode(rows, b, k, rule) for b, k in queries]
        np.testing.assert_allclose(db.decode_mfu("1-1-1", 1, bs, kv, rule), want, rtol=1e-12, atol=0)
