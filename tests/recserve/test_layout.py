"""recserve/layout.py describes the torchrec model's state dict exactly, without torchrec."""

import pytest

from recserve.layout import state_dict_shapes
from recserve.model import build_model
from recserve.workloads import BUNDLED, load_workload


@pytest.mark.parametrize("name", BUNDLED)
def test_layout_gives_every_key_and_shape_of_the_torchrec_model_in_its_order(name):
    workload = load_workload(name).with_max_rows(1000)  # shapes only: the meta device allocates nothing
    torchrec = {k: tuple(v.shape) for k, v in build_model(workload, device="meta").state_dict().items()}
    assert list(state_dict_shapes(workload).items()) == list(torchrec.items())
