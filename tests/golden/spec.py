"""The run behind the golden loss curve; shared by the test and the regeneration script."""
import os

from tests.conftest import tiny_run

GOLDEN_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_loss_curve.json")


def golden_run_values(data_prefix: str) -> dict:
    """The `tiny` preset as it is (batch 8 x 256 tokens, warmup 30, cosine), 50 steps, fp32."""
    return tiny_run(data_prefix, train_iters=50, lr_warmup_iters=30, seed=1234)
