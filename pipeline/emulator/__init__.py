"""A local stand-in for Trigger.dev's sessions API, served over real HTTP.

with start_in_thread(EmulatorConfig(sessions=5000, seed=7)) as emulator:
    httpx.get(emulator.url + "/api/v1/sessions", headers={"Authorization": "Bearer tr_dev_x"})
    emulator.store.iter_sessions()  # the truth to compare an export against
"""

from pipeline.emulator.config import EmulatorConfig
from pipeline.emulator.server import RunningEmulator, serve, start_in_thread
from pipeline.emulator.store import SessionStore

__all__ = ["EmulatorConfig", "RunningEmulator", "SessionStore", "serve", "start_in_thread"]
