"""The local broker locked down: TLS, SASL/SCRAM, the StandardAuthorizer and one principal per role.

``budgetflow kafka start --secure DIR`` keeps everything a secure broker needs in DIR:

- ``ca.pem`` (and ``ca.key``): a certificate authority made for this broker;
- ``broker.pem``: the broker's PKCS#8 key and certificate (SAN ``localhost``, ``127.0.0.1``), signed by the CA;
- ``credentials.json``: a random SCRAM-SHA-512 password per principal;
- ``<role>.env``: the ``BUDGETFLOW_KAFKA__*`` settings a process of that role sources.

DIR is 0700 and every key and secret in it 0600. A password is never on a command line (``ps`` shows every
process's arguments to every user): the storage tool reads its ``--add-scram`` arguments from an argument file,
the Kafka tools their credentials from a ``--command-config`` file.

Principals and what the ACLs let them do (everything else is refused:
``allow.everyone.if.no.acl.found=false``):

- ``admin``: a super user, for operators and for setting the ACLs;
- ``worker``: everything on topics, groups and transactional ids under the topic prefix (the workers, the CLI);
- ``router``: read the status, heartbeat and policy topics (BudgetView);
- ``gateway``: write the requests and usage topics (BudgetPublisher).

Clients reach the broker on one SASL_SSL listener. The KRaft controller listener takes TLS with a client
certificate only the broker holds, so it is no way around the ACLs.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from budgetflow.schemas.errors import LocalKafkaError

__all__ = ["BROKER_PRINCIPAL", "MECHANISM", "ROLES", "SecureDir", "write_private"]

MECHANISM = "SCRAM-SHA-512"
ROLES = ("admin", "worker", "router", "gateway")
BROKER_CN = "budgetflow-broker"
BROKER_PRINCIPAL = f"User:CN={BROKER_CN}"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable by its owner only (0600), also when the file was there before."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(fd, 0o600)
        handle.write(text)


def _openssl(*args: str, cwd: Path) -> None:
    tool = shutil.which("openssl")
    if tool is None:
        raise LocalKafkaError("`openssl` is not on PATH; a secure local broker needs it for its certificates")
    # umask 077: the keys openssl writes are never readable by others, not even for a moment.
    proc = subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, check=False, umask=0o077)
    if proc.returncode != 0:
        raise LocalKafkaError(f"openssl {args[0]} failed: {proc.stderr.strip()[-300:]}")


@dataclass(frozen=True)
class SecureDir:
    """The certificates and credentials of one secure local broker."""

    path: Path

    @property
    def ca(self) -> Path:
        return self.path / "ca.pem"

    @property
    def broker_pem(self) -> Path:
        return self.path / "broker.pem"

    @property
    def _credentials(self) -> Path:
        return self.path / "credentials.json"

    def ensure(self) -> None:
        """Create what is missing: the CA, the broker's key and certificate, a password per role."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        if not self.ca.exists() or not self.broker_pem.exists():
            self._certificates()
        if not self._credentials.exists():
            passwords = {role: secrets.token_urlsafe(24) for role in ROLES}
            write_private(self._credentials, json.dumps(passwords, indent=2) + "\n")
        # A directory made by an older version: its secrets become private too.
        for path in [self._credentials, self.broker_pem, *self.path.glob("*.key"), *self.path.glob("*.env")]:
            if path.exists():
                os.chmod(path, 0o600)

    def _certificates(self) -> None:
        """A certificate authority made for this broker, and the broker's key and certificate signed by it."""
        self._certificate_authority()
        self._broker_certificate()

    def _certificate_authority(self) -> None:
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "3650",
            "-subj",
            "/CN=budgetflow local CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            cwd=self.path,
        )

    def _broker_certificate(self) -> None:
        d = self.path
        _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "broker.key", cwd=d)
        _openssl("req", "-new", "-key", "broker.key", "-subj", f"/CN={BROKER_CN}", "-out", "broker.csr", cwd=d)
        (d / "broker.ext").write_text(
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            "broker.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "825",
            "-sha256",
            "-extfile",
            "broker.ext",
            "-out",
            "broker.crt",
            cwd=d,
        )
        # Kafka's PEM key store: the PKCS#8 key, then the certificate chain.
        write_private(self.broker_pem, (d / "broker.key").read_text() + (d / "broker.crt").read_text())
        for name in ("ca.key", "broker.key"):
            os.chmod(d / name, 0o600)
        for name in ("broker.csr", "broker.ext"):
            (d / name).unlink()

    def password(self, role: str) -> str:
        try:
            return str(json.loads(self._credentials.read_text())[role])
        except (OSError, ValueError, KeyError) as exc:
            raise LocalKafkaError(f"{self._credentials} has no password for {role!r} ({exc})") from exc

    def jaas(self, role: str) -> str:
        return (
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{role}" password="{self.password(role)}";'
        )

    def scram_arguments(self) -> list[str]:
        """``--add-scram`` arguments of the storage tool (every principal exists from the first start).

        They hold the passwords: write them to an argument file the tool reads (``@FILE``, one argument a line),
        never onto its command line. One argument each (``--add-scram=VALUE``), so a value is never read as a flag.
        """
        return [f"--add-scram={MECHANISM}=[name={role},password={self.password(role)}]" for role in ROLES]

    def server_properties(self, port: int, controller_port: int) -> dict[str, str]:
        return {
            "listeners": f"SASL_SSL://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            "advertised.listeners": f"SASL_SSL://127.0.0.1:{port}",
            "inter.broker.listener.name": "SASL_SSL",
            "listener.security.protocol.map": "SASL_SSL:SASL_SSL,CONTROLLER:SSL",
            "sasl.enabled.mechanisms": MECHANISM,
            "sasl.mechanism.inter.broker.protocol": MECHANISM,
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": self.jaas("admin"),
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(self.broker_pem),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.ca),
            # The controller listener: mutual TLS, and only the broker has a certificate for it.
            "listener.name.controller.ssl.client.auth": "required",
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "allow.everyone.if.no.acl.found": "false",
            "super.users": f"User:admin;{BROKER_PRINCIPAL}",
        }

    def client_properties(self, role: str) -> str:
        """A Java client's properties file (for the Kafka tools) as ``role``."""
        return (
            "security.protocol=SASL_SSL\n"
            f"sasl.mechanism={MECHANISM}\n"
            f"sasl.jaas.config={self.jaas(role)}\n"
            "ssl.truststore.type=PEM\n"
            f"ssl.truststore.location={self.ca}\n"
        )

    def env(self, role: str, bootstrap: str) -> dict[str, str]:
        """The budgetflow settings of a process connecting as ``role``."""
        return {
            "BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "BUDGETFLOW_KAFKA__SECURITY__PROTOCOL": "SASL_SSL",
            "BUDGETFLOW_KAFKA__SECURITY__SASL_MECHANISM": MECHANISM,
            "BUDGETFLOW_KAFKA__SECURITY__SASL_USERNAME": role,
            "BUDGETFLOW_KAFKA__SECURITY__SASL_PASSWORD": self.password(role),
            "BUDGETFLOW_KAFKA__SECURITY__SSL_CAFILE": str(self.ca),
        }

    def write_env_files(self, bootstrap: str) -> list[Path]:
        written = []
        for role in ROLES:
            path = self.path / f"{role}.env"
            write_private(path, "".join(f"{k}={v}\n" for k, v in self.env(role, bootstrap).items()))
            written.append(path)
        return written

    # Long only in lines: three argument lists, written one argument a line.
    def acl_commands(self, prefix: str) -> list[list[str]]:
        """AclCommand arguments granting each role its topics (``admin`` needs none: it is a super user)."""
        from budgetflow.schemas.settings import TopicSettings
        from budgetflow.streams.kafka.topics import Topics

        topics = Topics(TopicSettings(prefix=prefix))
        return [
            [
                "--add",
                "--allow-principal",
                "User:worker",
                "--operation",
                "All",
                "--resource-pattern-type",
                "prefixed",
                "--topic",
                prefix,
                "--group",
                prefix,
                "--transactional-id",
                prefix,
            ],
            [
                "--add",
                "--allow-principal",
                "User:router",
                "--operation",
                "Read",
                "--operation",
                "Describe",
                "--topic",
                topics.status.name,
                "--topic",
                topics.heartbeats.name,
                "--topic",
                topics.policies.name,
                "--topic",
                topics.leases.name,
            ],
            [
                "--add",
                "--allow-principal",
                "User:router",
                "--operation",
                "Write",
                "--operation",
                "Describe",
                "--topic",
                topics.lease_asks.name,
            ],
            [
                "--add",
                "--allow-principal",
                "User:gateway",
                "--operation",
                "Write",
                "--operation",
                "Describe",
                "--topic",
                topics.requests.name,
                "--topic",
                topics.usage.name,
            ],
        ]
