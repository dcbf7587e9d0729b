import io

from refproxy import progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_are_off_on_a_non_tty_and_on_for_a_tty(monkeypatch):
    monkeypatch.delenv("REFPROXY_PROGRESS", raising=False)
    assert progress.enabled(io.StringIO()) is False
    assert progress.enabled(_Tty()) is True


def test_environment_forces_either_way(monkeypatch):
    monkeypatch.setenv("REFPROXY_PROGRESS", "0")
    assert progress.enabled(_Tty()) is False
    monkeypatch.setenv("REFPROXY_PROGRESS", "1")
    assert progress.enabled(io.StringIO()) is True


def test_forced_bar_writes_to_stderr_and_disabled_bar_stays_silent(monkeypatch, capsys):
    monkeypatch.setenv("REFPROXY_PROGRESS", "1")
    with progress.bar(3, "fill", unit="entry", leave=True) as b:
        b.update(3)
    err = capsys.readouterr().err
    assert "fill" in err and "3/3" in err
    monkeypatch.setenv("REFPROXY_PROGRESS", "0")
    with progress.bar(3, "quiet") as b:
        b.update(3)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_counted_passes_items_through_and_counts_them_all():
    class Bar:
        def __init__(self):
            self.updates = []

        def update(self, n):
            self.updates.append(n)

    b = Bar()
    assert list(progress.counted(range(10), b, every=3)) == list(range(10))
    assert b.updates == [3, 3, 3, 1]
