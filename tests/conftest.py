import pytest

from harness.icegate_server import RunningServer, server_settings

pytest_plugins = ["harness.pytest_plugin"]


@pytest.fixture
def icegate_server(tmp_path):
    """A real icegate server on a free port with a frozen clock (`.clock`)."""
    with RunningServer(server_settings(tmp_path)) as server:
        yield server


@pytest.fixture
def free_port_unused():
    """A loopback TCP port nothing listens on."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
