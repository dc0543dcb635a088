"""The actor that collects a run's progress messages, apart from cluster.py so that its worker
process starts without importing what a fusing worker needs (torch: seconds of CPU per run)."""


class Progress:
    """Collects the pairs fused so far, sent by the tasks (a Ray actor on the driver's node)."""

    def __init__(self):
        self.events = []

    def add(self, label: str, ip: str, pairs: int) -> None:
        """A task fused `pairs` more."""
        self.events.append((label, ip, pairs))

    def take(self) -> list:
        """Return and forget the events so far."""
        events, self.events = self.events, []
        return events
