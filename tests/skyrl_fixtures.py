"""skyrl-gym environments of our own for tests/test_skyrl_env.py, referenced as
"skyrl:tests.skyrl_fixtures:<Class>" (the adapter makes them by import path, as it would a user's)."""

from __future__ import annotations

from skyrl_gym.envs.base_text_env import BaseTextEnv, BaseTextEnvStepOutput


class Flaky(BaseTextEnv):
    """A skyrl-gym environment of our own that raises on the policy's first reply."""

    def __init__(self, env_config=None, extras=None):
        super().__init__()

    def step(self, action: str) -> BaseTextEnvStepOutput:
        raise RuntimeError("the environment's own bug")


class Recorder(BaseTextEnv):
    """Remembers what it was made with and whether it was closed; always asks for another reply."""

    made: list["Recorder"] = []

    def __init__(self, env_config=None, extras=None):
        super().__init__()
        self.env_config, self.extras, self.closed = env_config, extras, False
        Recorder.made.append(self)

    def init(self, prompt):
        return [{"role": "system", "content": "Be brief."}] + prompt, {}

    def step(self, action: str) -> BaseTextEnvStepOutput:
        return BaseTextEnvStepOutput(observations=[{"role": "user", "content": "again"}], reward=0.25, done=False,
                                     metadata={})

    def close(self):
        self.closed = True
