import awqkit.runtime
from awqkit.runtime import timed


def test_nested_stages_do_not_overlap_and_sum_to_the_time_spent(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(awqkit.runtime.time, "perf_counter", lambda: now[0])

    def spend(seconds: float) -> None:
        now[0] += seconds

    timings: dict[str, float] = {}
    with timed(timings, "search"):
        spend(2.0)
        with timed(timings, "greedy"):
            spend(3.0)
        with timed(timings, "clip"):
            with timed(timings, "greedy"):
                spend(1.0)
            spend(2.0)
    assert timings == {"search": 2.0, "greedy": 4.0, "clip": 2.0}
    assert sum(timings.values()) == now[0]
