"""Which Celery workers ``pacs-ai serve`` starts, with and without GPUs."""

from __future__ import annotations

from pacs_ai.service import WorkerSpec, gpu_worker_devices, plan_workers


def test_without_gpu_cpu_workers_serve_every_queue() -> None:
    assert plan_workers(2, 3, []) == [
        WorkerSpec("pacs-ai-0", ("dispatch", "cpu", "gpu"), 3),
        WorkerSpec("pacs-ai-1", ("dispatch", "cpu", "gpu"), 3),
    ]


def test_with_gpus_one_single_task_worker_per_gpu_serves_the_gpu_queue() -> None:
    specs = plan_workers(1, 2, ["0", "1"])
    assert specs == [
        WorkerSpec("pacs-ai-0", ("dispatch", "cpu"), 2),
        WorkerSpec("pacs-ai-gpu0", ("gpu",), 1, "0"),
        WorkerSpec("pacs-ai-gpu1", ("gpu",), 1, "1"),
    ]


def test_gpu_devices_from_settings_visible_devices_or_count() -> None:
    assert gpu_worker_devices(None, 0, None) == []
    assert gpu_worker_devices(None, 2, None) == ["0", "1"]
    assert gpu_worker_devices(None, 2, "3,5") == ["3", "5"]
    assert gpu_worker_devices(None, 1, "GPU-abc, GPU-def") == ["GPU-abc"]
    assert gpu_worker_devices(["2"], 4, None) == ["2"]
    assert gpu_worker_devices([], 4, None) == []
