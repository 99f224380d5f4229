"""The Gymnasium environment for schedule construction, registered as ``schedgym/Schedule-v2``."""

from gymnasium.envs.registration import register, registry

from .schedule_env import MAX_STEPS, ScheduleEnv

ENV_ID = "schedgym/Schedule-v2"

if ENV_ID not in registry:
    register(id=ENV_ID, entry_point="envs.schedule_env:ScheduleEnv")

__all__ = ["ENV_ID", "MAX_STEPS", "ScheduleEnv"]
