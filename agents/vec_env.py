"""Vectorised envs whose steps run side by side, for training on a cluster.

Almost all of an episode's time is measuring its kernels (compile and run: 97% in
BENCHMARKS.md's episode split), and measuring waits on the cluster, not on this
process. So the envs stay here, each stepped in its own thread, and share one
measurer (one cache, one tuning log on the driver) whose Ray backend spreads the
compiles and runs of all envs' kernels over the cluster; the cheap part (mask,
features, cost model, ~1 ms a step) stays serial under the GIL. Envs in remote
actors would each need their own copy of the online-updated cost model and cache,
and would ship their records back to the driver's log.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from copy import deepcopy
from typing import Any, Callable

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import DummyVecEnv


class ThreadVecEnv(DummyVecEnv):
    """``DummyVecEnv`` whose ``step`` and ``reset`` call every env at once, in threads;
    results are gathered in env order, so a run sees what ``DummyVecEnv`` would show."""

    def __init__(self, env_fns: list[Callable[[], gym.Env]]):
        super().__init__(env_fns)
        self._pool = ThreadPoolExecutor(self.num_envs, thread_name_prefix="env")

    def step_wait(self):
        def one(i: int):
            obs, reward, terminated, truncated, info = self.envs[i].step(self.actions[i])
            reset = None
            if terminated or truncated:
                reset = self.envs[i].reset()
            return obs, reward, terminated, truncated, info, reset

        for i, (obs, reward, terminated, truncated, info, reset) in enumerate(
                self._pool.map(one, range(self.num_envs))):
            self.buf_rews[i] = reward
            self.buf_dones[i] = terminated or truncated
            info["TimeLimit.truncated"] = truncated and not terminated
            if reset is not None:
                info["terminal_observation"] = obs
                obs, self.reset_infos[i] = reset
            self.buf_infos[i] = info
            self._save_obs(i, obs)
        return self._obs_from_buf(), np.copy(self.buf_rews), np.copy(self.buf_dones), deepcopy(self.buf_infos)

    def reset(self):
        def one(i: int):
            options = {"options": self._options[i]} if self._options[i] else {}
            return self.envs[i].reset(seed=self._seeds[i], **options)

        for i, (obs, info) in enumerate(self._pool.map(one, range(self.num_envs))):
            self.reset_infos[i] = info
            self._save_obs(i, obs)
        self._reset_seeds()
        self._reset_options()
        return self._obs_from_buf()

    def close(self) -> None:
        self._pool.shutdown()
        super().close()


class Serialized:
    """``obj`` with its methods called one thread at a time (a cost model that several
    env threads predict with and update)."""

    def __init__(self, obj: Any):
        self._obj = obj
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._obj, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return call
