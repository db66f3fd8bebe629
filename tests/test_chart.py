"""A picture of a run: the samples a local run appends, and the HTML chart drawn from them."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import WINDOW

from pipeline.dev import cli
from pipeline.dev.simulator import SimulatorConfig, SimulatorProcess
from pipeline.local.chart import CHART_FILE, MAX_POINTS, write_chart
from pipeline.local.samples import SAMPLES_FILE, Sample, SampleLog, read, tail
from pipeline.local.scheduler import STATE_DIR, LocalOptions, run_local
from pipeline.stages import STAGE_NAMES

RUN = WINDOW.run_id
T0 = 1_800_000_000.0


def sample(at: float, started: float, calls: int, depth: tuple[int, int, int], **kw: int) -> Sample:
    troops, warriors, groups = depth
    return Sample(
        run_id=RUN,
        at=at,
        started=started,
        visible={"troops": troops, "warriors": 0, "data_groups": groups},
        in_flight={"troops": 0, "warriors": warriors, "data_groups": 1},
        dead={"troops": 0, "warriors": 0, "data_groups": kw.get("dead", 0)},
        calls=calls,
        rate_limited=kw.get("rate_limited", 0),
        limit=50.0,
    )


# Two processes: the first killed after 3 s, the second resumed 40 s later (wall time).
SAMPLES = [
    sample(T0 + 0, T0, 1, (4, 0, 0)),
    sample(T0 + 1, T0, 41, (0, 20, 10)),
    sample(T0 + 2, T0, 91, (0, 10, 60), rate_limited=1),
    sample(T0 + 3, T0, 140, (0, 0, 90), rate_limited=1),
    sample(T0 + 43, T0 + 42.5, 0, (0, 0, 80)),
    sample(T0 + 44, T0 + 42.5, 50, (0, 0, 30), dead=2),
    sample(T0 + 45.5, T0 + 42.5, 80, (0, 0, 0), dead=2),
]


class Polylines(HTMLParser):
    """Every <svg> panel's plot area and y scale, and every polyline in it."""

    def __init__(self) -> None:
        super().__init__()
        self.panels: list[dict[str, str]] = []
        self.lines: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        a = {k: v or "" for k, v in attrs}
        if tag == "svg":
            self.panels.append(a)
        elif tag == "polyline":
            self.lines[a["data-series"]] = (a, self.panels[-1])


def drawn(html: str) -> Polylines:
    parser = Polylines()
    parser.feed(html)
    return parser


def values_at(line: dict[str, str], panel: dict[str, str]) -> tuple[list[float], list[float]]:
    """(x, value) of each point, read back from the drawing through the panel's scale."""
    x0, y0, _, h = (float(v) for v in panel["data-plot"].split())
    y_max = float(panel["data-y-max"])
    points = [tuple(float(c) for c in p.split(",")) for p in line["points"].split()]
    return [x - x0 for x, _ in points], [(y0 + h - y) / h * y_max for _, y in points]


def test_chart_is_self_contained_html_whose_lines_are_the_sampled_series(
    tmp_path: Path,
) -> None:
    # GIVEN the samples of a run stopped once and resumed
    log = SampleLog(tmp_path / SAMPLES_FILE)
    for s in SAMPLES:
        log.append(s)
    log.close()

    # WHEN its chart is written
    path = write_chart(tmp_path / SAMPLES_FILE, tmp_path / "out", RUN)

    # THEN it sits beside the manifest, one HTML file referring to nothing outside it
    assert path == tmp_path / "out" / "runs" / RUN / CHART_FILE
    html = path.read_text()
    assert html.startswith("<!doctype html>")
    for outside in ("http://", "https://", "src=", "href=", "@import", "url("):
        assert outside not in html
    chart = drawn(html)
    assert {"script", "link", "img", "iframe"}.isdisjoint(chart.tags)
    assert len(chart.panels) == 2

    # AND the queue lines are each stage's visible + in-flight messages at every sample
    expected_queued = {
        stage: [s.visible[stage] + s.in_flight[stage] for s in SAMPLES] for stage in STAGE_NAMES
    }
    for stage, want in expected_queued.items():
        line, panel = chart.lines[stage]
        assert [float(v) for v in line["data-values"].split()] == want
        _, read_back = values_at(line, panel)
        assert read_back == pytest.approx(want, abs=0.05 * max(want + [1]))
    assert [float(v) for v in chart.lines["dead letters"][0]["data-values"].split()] == [
        0,
        0,
        0,
        0,
        0,
        2,
        2,
    ]

    # AND calls per second are each process's own, between consecutive samples
    line, panel = chart.lines["calls/s"]
    want_rate = [40.0, 50.0, 49.0, 50.0, 20.0]
    assert [float(v) for v in line["data-values"].split()] == want_rate
    xs, read_back = values_at(line, panel)
    assert read_back == pytest.approx(want_rate, abs=0.5)
    # the resumed process continues where the first left off (3 s), not 40 s later
    assert xs == sorted(xs) and xs[-1] / xs[0] == pytest.approx(5.5 / 1.0, rel=0.01)
    assert "limit 50/s" in chart.lines
    assert "resumed" in html and "1 × 429" in html
    assert "220 vendor calls, 1 × 429" in html


def test_long_runs_are_thinned_to_a_drawable_number_of_points(tmp_path: Path) -> None:
    log = SampleLog(tmp_path / SAMPLES_FILE)
    for i in range(3 * MAX_POINTS):
        log.append(sample(T0 + i, T0, 10 * i, (0, 0, i % 7)))
    log.close()

    path = write_chart(tmp_path / SAMPLES_FILE, tmp_path / "out", RUN)

    assert path is not None
    line, _ = drawn(path.read_text()).lines["data_groups"]
    assert 2 <= len(line["points"].split()) <= MAX_POINTS + 2


def test_a_sample_line_cut_short_by_a_kill_costs_only_itself(tmp_path: Path) -> None:
    # GIVEN a samples file whose last line a killed process left half written
    path = tmp_path / SAMPLES_FILE
    path.write_text(SAMPLES[0].to_json() + "\n" + SAMPLES[1].to_json()[:30])

    # WHEN the next process appends
    log = SampleLog(path)
    log.append(SAMPLES[2])
    log.close()

    # THEN the whole samples read back, the torn one skipped
    assert read(path) == [SAMPLES[0], SAMPLES[2]]
    assert tail(path, 1) == [SAMPLES[2]]


def test_no_samples_no_chart(tmp_path: Path) -> None:
    assert write_chart(tmp_path / SAMPLES_FILE, tmp_path / "out", RUN) is None


def test_local_run_samples_itself_and_writes_its_chart_beside_the_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a small local run
    out = tmp_path / "out"
    tree = SimulatorConfig(troops=2, warriors_per_troop=2, data_groups_per_warrior=3)
    options = LocalOptions(
        window=WINDOW,
        out=out,
        tick=0.2,
        invocation_timeout=10.0,
        safety_margin=2.0,
        simulator=SimulatorProcess(tree),
    )

    # WHEN it runs
    result = run_local(options)

    # THEN its samples end with the run's last state, and its chart sits beside the manifest
    assert result.exit_code == 0
    samples = read(out / STATE_DIR / SAMPLES_FILE, RUN)
    assert samples and samples[-1].calls == result.calls
    assert all(samples[-1].queued(s) == 0 for s in STAGE_NAMES)
    assert result.chart == result.manifest.with_name(CHART_FILE)
    assert result.chart.exists()

    # WHEN the chart is gone and `harvest status --chart` runs
    result.chart.unlink()
    code = cli.main(["status", "--chart", "--out", str(out)])

    # THEN it is drawn again from the samples
    assert code == 0
    assert f"chart: {result.chart}" in capsys.readouterr().out.replace("\n", "")
    assert result.chart.exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_samples_that_cannot_be_written_do_not_stop_the_run() -> None:
    # GIVEN a samples file on a full disk
    log = SampleLog(Path("/dev/full"))

    # WHEN samples are appended THEN nothing is raised
    log.append(SAMPLES[0])
    log.append(SAMPLES[1])
    log.close()
