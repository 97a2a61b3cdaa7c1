"""The small real-text dataset of the training tests (standard-library sources through data_prep)."""

from tests.training.conftest import small_data  # noqa: F401
