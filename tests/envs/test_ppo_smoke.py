"""MaskablePPO runs on the environment (a smoke test, not a learning test)."""

from __future__ import annotations

import numpy as np
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.utils import get_action_masks


def test_maskable_ppo_learns_and_predicts_unmasked_actions(make_env):
    env = make_env("matmul", shape="16x16x16", reward="surrogate")
    model = MaskablePPO("MlpPolicy", env, n_steps=64, batch_size=32, seed=0, device="cpu")
    model.learn(total_timesteps=200)
    assert model.num_timesteps >= 200

    masks = get_action_masks(model.get_env())
    assert masks.shape == (1, env.action_space.n) and masks[0, env.table.done]

    obs, _ = env.reset(seed=1)
    for step in range(10):
        mask = env.action_masks()
        for deterministic in (True, False):
            action, _ = model.predict(obs, action_masks=mask, deterministic=deterministic)
            assert mask[int(action)], f"step {step}: predicted masked action {env.table.actions[int(action)]}"
        obs, _, terminated, truncated, info = env.step(int(action))
        assert "masked" not in info.get("error", "")
        if terminated or truncated:
            break
    assert np.isfinite(obs).all()
