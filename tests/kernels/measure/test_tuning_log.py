import json
import logging
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.target import Target
from kernels.measure.tuning_log import TuningLog, TuningRecord, measure_key

TARGET = Target("cpu", "Test CPU", 2, 8, "gcc 12")


def rec(time_ms=1.0, correct=True, schedule=None, shape="8x8x8", hardware="Test CPU", **kw):
    return TuningRecord(op="matmul", shape=shape, target="cpu", hardware=hardware,
                        compiler="gcc 12", schedule=schedule if schedule is not None else [["tile", 4]],
                        time_ms=time_ms, times_ms=(time_ms,) * 3,
                        gflops=1.0 if correct else 0.0, correct=correct,
                        error=None if correct else "wrong result: max rel err 1.0e+00", **kw)


def test_round_trip(tmp_path):
    log = TuningLog(tmp_path / "a" / "b" / "log.jsonl")   # parents are created
    records = [rec(2.0), rec(math.inf, correct=False), rec(1.5, schedule={"x": [1, 2]})]
    for r in records:
        log.append(r)
    assert log.read() == records
    assert list(log) == records
    # One line per record; an infinite time is written as null, which is plain JSON.
    lines = log.path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[1])["time_ms"] is None


def test_missing_file_reads_empty(tmp_path):
    assert TuningLog(tmp_path / "none.jsonl").read() == []


def test_truncated_last_line_is_skipped_with_warning(tmp_path, caplog):
    log = TuningLog(tmp_path / "log.jsonl")
    log.append(rec(1.0))
    log.append(rec(2.0))
    with open(log.path, "a") as f:
        f.write(rec(3.0).to_json()[:40])   # a writer killed mid-line
    with caplog.at_level(logging.WARNING):
        records = log.read()
    assert [r.time_ms for r in records] == [1.0, 2.0]
    assert any(str(log.path) in m and ":3:" in m for m in caplog.messages)

    # The next append starts on a fresh line, so it survives the broken one.
    log.append(rec(4.0))
    assert [r.time_ms for r in log.read()] == [1.0, 2.0, 4.0]


def test_corrupt_middle_lines_skipped(tmp_path, caplog):
    log = TuningLog(tmp_path / "log.jsonl")
    log.append(rec(1.0))
    with open(log.path, "a") as f:
        f.write('{"op": "matmul", "shape": "8x8x8"}\n')   # missing keys
        f.write("not json at all\n")
        f.write("[1, 2]\n")
        f.write(json.dumps({**json.loads(rec(1.0).to_json()), "time_ms": "fast"}) + "\n")
    log.append(rec(5.0))
    with caplog.at_level(logging.WARNING):
        assert [r.time_ms for r in log.read()] == [1.0, 5.0]
    assert sum("skipping corrupt" in m for m in caplog.messages) == 4
    assert any("missing keys" in m and ":2:" in m for m in caplog.messages)


def test_best(tmp_path):
    log = TuningLog(tmp_path / "log.jsonl")
    assert log.best("matmul", "8x8x8", TARGET) is None
    for r in [rec(3.0), rec(0.5, correct=False), rec(2.0, schedule=[["tile", 8]]),
              rec(1.0, hardware="Other CPU"), rec(0.1, shape="16x16x16")]:
        log.append(r)
    assert log.best("matmul", "8x8x8", TARGET).time_ms == 2.0
    assert log.best("matmul", "8,8,8", "cpu").time_ms == 1.0   # any cpu; shape spelled differently
    assert log.best("matmul", (16, 16, 16)).time_ms == 0.1
    assert log.best("conv2d", "1,1,4,4,1,3,3") is None


def test_key_ignores_schedule_spelling():
    a = rec(schedule=json.loads('{"b": [1, 2], "a": 1}'))
    b = rec(schedule=json.loads('{"a":1,"b":[1,2]}'), shape="8,8,8")
    assert a.key == b.key
    assert a.key == measure_key("matmul", (8, 8, 8), {"a": 1, "b": [1, 2]}, "cpu", "Test CPU", "gcc 12")
    assert a.key != rec(schedule={"a": 2, "b": [1, 2]}).key


json_data = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
    max_leaves=8)


@settings(max_examples=50, deadline=None)
@given(schedule=json_data,
       time_ms=st.floats(min_value=0, allow_nan=False, allow_infinity=True),
       error=st.none() | st.text(max_size=20))
def test_json_round_trip(schedule, time_ms, error):
    r = rec(time_ms=time_ms, schedule=schedule)
    r.error = error
    back = TuningRecord.from_json(r.to_json())
    assert back == r and back.key == r.key


def _write_forged(log: TuningLog, **fields) -> None:
    with open(log.path, "a") as f:
        f.write(json.dumps({**json.loads(rec(1.0).to_json()), **fields}) + "\n")


def test_impossible_records_are_skipped_with_the_line(tmp_path, caplog):
    log = TuningLog(tmp_path / "log.jsonl", TARGET)
    log.append(rec(2.0))
    _write_forged(log, time_ms=-1.0, times_ms=[-1.0])                         # line 2
    _write_forged(log, time_ms=0.0, times_ms=[0.0])                           # 3
    _write_forged(log, time_ms=None, times_ms=[None])                         # 4: inf, yet correct
    _write_forged(log, gflops=-3.0)                                           # 5
    _write_forged(log, time_ms=1e-6, times_ms=[1e-6])                         # 6: 1024 flops in 1 ns
    _write_forged(log, gflops=1e5)                                            # 7: above this CPU's peak
    _write_forged(log, time_ms=0.5)                                           # 8: median of [1, 1, 1]?
    _write_forged(log, time_ms=-1.0, times_ms=[], correct=False, error="x")   # 9: negative, even failed
    log.append(rec(math.inf, correct=False))                                  # 10: a failure is fine
    with caplog.at_level(logging.WARNING):
        assert [r.time_ms for r in log.read()] == [2.0, math.inf]
    skipped = [m for m in caplog.messages if "skipping impossible tuning record" in m]
    assert [m.split(":")[-2] for m in skipped] == [str(i) for i in range(2, 10)]


def test_peak_is_the_targets_for_its_own_hardware_only(tmp_path):
    log = TuningLog(tmp_path / "log.jsonl")
    mine, other = rec(1.0), rec(1.0, hardware="Big machine")
    mine.gflops = other.gflops = 1e4      # 10 TFLOPS: not on a 2-core CPU, maybe elsewhere
    log.append(mine)
    log.append(other)
    assert len(log.read()) == 2           # no target: only a bound no device reaches
    assert [r.hardware for r in log.records(TARGET)] == ["Big machine"]
    assert [r.hardware for r in TuningLog(log.path, TARGET)] == ["Big machine"]


def test_forged_record_never_becomes_best(tmp_path):
    from kernels.measure import Measurer
    from kernels.measure.result import MeasureResult

    log = TuningLog(tmp_path / "log.jsonl")
    honest, forged = rec(2.0), rec(2.0, schedule=[["tile", 99]])
    log.append(honest)
    _write_forged(log, schedule=forged.schedule, time_ms=-1.0, times_ms=[-1.0], correct=True)
    assert log.best("matmul", "8x8x8", TARGET).time_ms == 2.0
    assert log.best("matmul", "8x8x8").time_ms == 2.0

    m = Measurer(TARGET, runner=object(), builder=object(), log=log)
    assert m.cache == {honest.key: MeasureResult.from_record(honest)}
    assert not MeasureResult.from_record(TuningRecord.from_json(log.path.read_text().splitlines()[1])).ok
