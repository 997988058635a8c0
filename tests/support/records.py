"""What the tests read back of a calibration source."""

from mergekit_com.io.calibration import load_labeled
from mergekit_com.io.datasets_source import RecordSpec


def load_records(path: str, num_samples: int, spec: RecordSpec = RecordSpec()):
    """The first ``num_samples`` non-empty records of a calibration source, as read."""
    return [row for _, row in load_labeled(path, num_samples, spec=spec)[0]]
