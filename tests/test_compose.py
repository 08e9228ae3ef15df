"""docker-compose.yml, checked without Docker: parsed and validated, and each service's command
run natively where this machine can (Mosquitto with the compose config, the service itself)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from coldchain import pdf
from coldchain.embedded import free_port, mosquitto_binary, wait_for_port
from coldchain.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
SERVICES: dict[str, Any] = COMPOSE["services"]


def test_compose_declares_the_services_and_their_volumes() -> None:
    assert set(SERVICES) == {"postgres", "mosquitto", "coldchain", "grafana"}
    assert SERVICES["postgres"]["image"].startswith("postgres:")
    assert SERVICES["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    assert SERVICES["coldchain"]["build"] == "."
    # Both stateful services keep their data in named volumes that compose declares.
    assert any(v.startswith("pgdata:") for v in SERVICES["postgres"]["volumes"])
    assert any(
        v.startswith("mosquitto-data:/mosquitto/data") for v in SERVICES["mosquitto"]["volumes"]
    )
    assert set(COMPOSE["volumes"]) == {"pgdata", "mosquitto-data", "grafana-data"}
    depends = SERVICES["coldchain"]["depends_on"]
    assert depends["postgres"]["condition"] == "service_healthy"
    assert "mosquitto" in depends


def test_the_service_environment_is_valid_configuration_pointing_at_the_other_services() -> None:
    env = {k: str(v) for k, v in SERVICES["coldchain"]["environment"].items()}
    settings = Settings.from_env(env)
    assert urlsplit(settings.database_url).hostname == "postgres"
    pg = SERVICES["postgres"]["environment"]
    assert settings.database_url == (
        f"postgresql://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}"
    )
    assert settings.mqtt.host == "mosquitto" and settings.mqtt.port == 1883
    assert settings.http_host == "0.0.0.0"  # noqa: S104 - inside its container, by design
    published = SERVICES["coldchain"]["ports"][0]
    assert published.endswith(f":{settings.http_port}")


def test_the_image_runs_what_compose_runs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.MULTILINE)
    assert cmd is not None
    assert yaml.safe_load(cmd.group(1)) == SERVICES["coldchain"]["command"]


def _mosquitto_conf_here(data: Path, port: int) -> Path:
    """The compose config with its listener and data path moved to this test's port and dir."""
    volumes = SERVICES["mosquitto"]["volumes"]
    source = next(v.split(":")[0] for v in volumes if v.endswith("mosquitto.conf:ro"))
    text = (ROOT / source).read_text(encoding="utf-8")
    text = text.replace("listener 1883", f"listener {port} 127.0.0.1")
    text = text.replace("persistence_location /mosquitto/data/", f"persistence_location {data}/")
    if os.geteuid() == 0:
        text += "user root\n"
    conf = data / "mosquitto.conf"
    conf.write_text(text, encoding="utf-8")
    return conf


@pytest.fixture
def compose_mosquitto(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    if mosquitto_binary() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("mosquitto is not installed; CI needs it (apt-get install mosquitto)")
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    port = free_port()
    yield _mosquitto_conf_here(tmp_path, port), port


def _start(conf: Path, port: int) -> subprocess.Popen[bytes]:
    binary = mosquitto_binary()
    assert binary is not None
    process = subprocess.Popen(
        [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_port(port, 10, process, "mosquitto")
    return process


@pytest.mark.mqtt
def test_compose_mosquitto_keeps_queued_qos1_messages_of_a_session_across_a_restart(
    compose_mosquitto: tuple[Path, int], unique: str
) -> None:
    conf, port = compose_mosquitto
    topic = f"coldchain/v1/dewars/CMP-{unique}/telemetry"
    received: list[bytes] = []

    def subscriber() -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"sub-{unique}", clean_session=False
        )
        client.on_message = lambda c, u, m: received.append(bytes(m.payload))
        return client

    broker = _start(conf, port)
    try:
        sub = subscriber()
        sub.connect("127.0.0.1", port)
        sub.loop_start()
        sub.subscribe(topic, qos=1)
        time.sleep(0.3)
        sub.disconnect()
        sub.loop_stop()

        pub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{unique}")
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        infos = [pub.publish(topic, f"reading {i}".encode(), qos=1) for i in range(2000)]
        for info in infos:
            info.wait_for_publish(10)
        pub.disconnect()
        pub.loop_stop()
    finally:
        broker.terminate()
        broker.wait(10)

    broker = _start(conf, port)
    try:
        sub = subscriber()
        sub.connect("127.0.0.1", port)
        sub.loop_start()
        deadline = time.monotonic() + 15
        while len(received) < 2000 and time.monotonic() < deadline:
            time.sleep(0.05)
        sub.disconnect()
        sub.loop_stop()
    finally:
        broker.terminate()
        broker.wait(10)
    assert sorted(received) == sorted(f"reading {i}".encode() for i in range(2000))


@pytest.mark.postgres
@pytest.mark.mqtt
def test_the_service_command_runs_natively_with_the_compose_environment(
    database_url: str, mqtt_url: str, unique: str
) -> None:
    env = {k: str(v) for k, v in SERVICES["coldchain"]["environment"].items()}
    port = free_port()
    env.update(
        COLDCHAIN_DATABASE_URL=database_url,
        COLDCHAIN_MQTT_URL=mqtt_url,
        COLDCHAIN_HTTP_HOST="127.0.0.1",
        COLDCHAIN_HTTP_PORT=str(port),
        COLDCHAIN_MQTT_CLIENT_ID=f"compose-{unique}",
    )
    command = SERVICES["coldchain"]["command"]
    executable = shutil.which(command[0], path=str(Path(sys.executable).parent))
    assert executable is not None, f"{command[0]} is not installed beside {sys.executable}"
    process = subprocess.Popen(
        [executable, *command[1:]],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, 30, process, "coldchain serve")
        import urllib.request

        deadline = time.monotonic() + 30
        status = 0
        while time.monotonic() < deadline and status != 200:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as r:
                    status = r.status
            except OSError:
                time.sleep(0.2)
        assert status == 200
    finally:
        process.terminate()
        assert process.wait(20) == 0


def test_grafana_is_provisioned_from_the_repository_against_the_compose_database() -> None:
    grafana = SERVICES["grafana"]
    mounts = {
        v.split(":")[1]: ROOT / v.split(":")[0] for v in grafana["volumes"] if v.startswith("./")
    }
    provisioning = mounts["/etc/grafana/provisioning"]
    assert (provisioning / "datasources" / "coldchain.yaml").is_file()
    provider = yaml.safe_load((provisioning / "dashboards" / "coldchain.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert mounts[path].is_dir() and list(mounts[path].glob("*.json"))
    source = yaml.safe_load((provisioning / "datasources" / "coldchain.yaml").read_text())
    (pg,) = source["datasources"]
    env = SERVICES["postgres"]["environment"]
    assert pg["url"] == "postgres:5432"
    assert (pg["user"], pg["jsonData"]["database"], pg["secureJsonData"]["password"]) == (
        env["POSTGRES_USER"],
        env["POSTGRES_DB"],
        env["POSTGRES_PASSWORD"],
    )
    assert grafana["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_the_image_serves_the_dashboard_with_its_npm_libraries() -> None:
    # A non-editable install finds no dashboards/ beside its source: the image must name it,
    # and fill it with what `npm ci` vendors, as the set-up commands do on a machine.
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    env = re.search(r"^ENV COLDCHAIN_DASHBOARD_DIR=(\S+)$", dockerfile, re.MULTILINE)
    assert env is not None
    target = env.group(1)
    copy = re.search(r"^COPY --from=(\w+) (\S+) (\S+)$", dockerfile, re.MULTILINE)
    assert copy is not None and copy.group(3) == target
    stage = re.search(rf"^FROM \S+ AS {copy.group(1)}$(.*?)^FROM ", dockerfile, re.M | re.S)
    assert stage is not None and "npm ci --prefix dashboards" in stage.group(1)
    assert copy.group(2).endswith("/dashboards/web")
    assert (ROOT / "dashboards" / "web" / "index.html").is_file()


def test_the_image_builds_the_compiled_route_search() -> None:
    # setup.py compiles routing.search with mypyc: the image needs the file and a C compiler
    # for its install (without them it would quietly install the slower pure Python search).
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    copied = " ".join(re.findall(r"^COPY (?!--from)(.*) \./$", dockerfile, re.MULTILINE))
    assert "setup.py" in copied.split()
    install = re.search(r"apt-get install ([^&]*)&& pip install", dockerfile)
    assert install is not None and "gcc" in install.group(1)


def test_the_image_has_the_fonts_the_pdf_report_looks_for() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    installs = " ".join(re.findall(r"apt-get install ([^&]*)", dockerfile))
    assert "fonts-dejavu-core" in installs  # /usr/share/fonts/truetype/dejavu
    assert "fonts-wqy-microhei" in installs
    assert pdf._FALLBACK_FONTS[0] == Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc")
