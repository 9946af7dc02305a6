"""The row sweep's helpers (``benchmarks/gpu_linear_rows.py``): its GPU part runs on the device only."""

from benchmarks.gpu_linear_rows import parse_rows, slow_rows


def test_parse_rows_range_and_list():
    assert parse_rows("272:320:16") == [272, 288, 304, 320]
    assert parse_rows("272:330") == [272, 288, 304, 320]
    assert parse_rows("448,512") == [448, 512]


def test_slow_rows_flags_only_a_dip_in_rate():
    rows = [256, 272, 288, 304, 320]
    smooth = [m * 0.5 for m in rows]  # the same FLOP rate everywhere
    assert slow_rows(rows, smooth, 0.8) == []
    spiked = list(smooth)
    spiked[2] *= 1.8  # 288 rows took 1.8x its share: its rate is 0.56 of its neighbours'
    assert slow_rows(rows, spiked, 0.8) == [288]
    assert slow_rows(rows, spiked, 0.5) == []
    # the rate, not the time: doubling rows at the same rate doubles the time, and is not slow
    assert slow_rows([128, 256, 512], [64.0, 128.0, 256.0], 0.8) == []
