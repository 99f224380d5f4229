"""ThreadVecEnv steps envs side by side but shows what DummyVecEnv would."""

from __future__ import annotations

import threading
import time

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env import DummyVecEnv

from agents.vec_env import Serialized, ThreadVecEnv


class Countdown(gym.Env):
    """Episodes of a seeded random length; each step sleeps, as a measurement would."""

    observation_space = spaces.Box(0, 100, (2,), np.float32)
    action_space = spaces.Discrete(3)

    def __init__(self, sleep_s: float = 0.0):
        self.sleep_s = sleep_s
        self.threads: set[int] = set()

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.left = int(self.np_random.integers(2, 6))
        return np.array([self.left, 0], np.float32), {"start": self.left}

    def step(self, action):
        self.threads.add(threading.get_ident())
        time.sleep(self.sleep_s)
        self.left -= 1
        obs = np.array([self.left, action], np.float32)
        return obs, float(action) - self.left, self.left <= 0, False, {"left": self.left}


def _rollout(vec, steps: int):
    vec.seed(3)
    out = [vec.reset()]
    for t in range(steps):
        obs, rew, done, info = vec.step(np.array([(t + i) % 3 for i in range(vec.num_envs)]))
        out.append((obs, rew, done, [(i.get("left"), i.get("terminal_observation") is not None) for i in info]))
    return out


def test_thread_vec_env_matches_dummy_vec_env():
    dummy = _rollout(DummyVecEnv([Countdown for _ in range(3)]), 20)
    threaded = ThreadVecEnv([Countdown for _ in range(3)])
    try:
        got = _rollout(threaded, 20)
    finally:
        threaded.close()
    np.testing.assert_array_equal(got[0], dummy[0])
    for (o1, r1, d1, i1), (o2, r2, d2, i2) in zip(got[1:], dummy[1:]):
        np.testing.assert_array_equal(o1, o2)
        np.testing.assert_array_equal(r1, r2)
        np.testing.assert_array_equal(d1, d2)
        assert i1 == i2


def test_thread_vec_env_steps_envs_at_once():
    vec = ThreadVecEnv([lambda: Countdown(sleep_s=0.2) for _ in range(4)])
    try:
        vec.reset()
        t0 = time.perf_counter()
        vec.step(np.zeros(4, dtype=int))
        assert time.perf_counter() - t0 < 0.6  # one after another would take 0.8 s
        assert len(set().union(*(e.threads for e in vec.envs))) == 4
    finally:
        vec.close()


def test_serialized_calls_one_at_a_time():
    inside, peak = [], []

    class Model:
        scale = 2

        def predict(self, x):
            inside.append(1)
            peak.append(len(inside))
            time.sleep(0.01)
            inside.pop()
            return x * self.scale

    model = Serialized(Model())
    threads = [threading.Thread(target=model.predict, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(peak) == 1 and len(peak) == 8
    assert model.predict(3) == 6 and model.scale == 2
