"""Several GPUs in one process are refused (DataParallel would split the batch under the loss hook)."""

import pytest

from qwen_tune.config import ConfigError
from qwen_tune.train.devices import check_single_process_devices


def test_several_gpus_without_launcher_are_refused():
    with pytest.raises(ConfigError, match=r"4 GPUs are visible .* use --nproc 4 .*CUDA_VISIBLE_DEVICES=0"):
        check_single_process_devices(visible_gpus=4, world_size=1, use_cpu=False)
    # One GPU, a launched run (one GPU per process), or CPU training: fine.
    check_single_process_devices(visible_gpus=1, world_size=1, use_cpu=False)
    check_single_process_devices(visible_gpus=0, world_size=1, use_cpu=False)
    check_single_process_devices(visible_gpus=4, world_size=4, use_cpu=False)
    check_single_process_devices(visible_gpus=4, world_size=1, use_cpu=True)

