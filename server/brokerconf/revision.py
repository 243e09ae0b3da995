"""The fleet's broker-credentials revision: one counter in the database that every change to
who may log in to the broker moves forward.

Every API process that keeps a Mosquitto configuration folder
(:class:`~server.brokerconf.follow.CredentialsFollower`) compares this number with the one
its files were rendered at, so a change made through any API process, on any host,
reaches every broker folder -- without re-reading 10,000 credentials when nothing changed.

What always holds:

- The table ``broker_credentials_revision`` (migration ``0012``) holds one row, ``id`` 1.
- :func:`bump_credentials_revision` runs in the transaction of the change it announces
  (enrollment of an accepted device, accept, reject, revoke), so the new number becomes
  visible in the same commit as the change, never before it. The bump is an ``UPDATE``
  of that one row: concurrent changes wait for each other's commit at this row, so a
  reader that sees revision *n* also sees every change numbered up to *n*. Callers bump
  last in their transaction, so the row is held only until their commit.
- The number only grows; its value means nothing beyond "changed since".
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, update
from sqlmodel import Field, Session, SQLModel, col, select

__all__ = [
    "TABLE",
    "BrokerCredentialsRevision",
    "bump_credentials_revision",
    "credentials_revision",
]

TABLE = "broker_credentials_revision"
_ROW_ID = 1


class BrokerCredentialsRevision(SQLModel, table=True):
    """The one row counting changes to the fleet's broker credentials."""

    __tablename__ = TABLE

    id: int = Field(default=_ROW_ID, primary_key=True)
    revision: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))


def bump_credentials_revision(session: Session) -> None:
    """Move the revision forward in ``session``'s transaction (flushed, not committed)."""
    moved = session.exec(
        update(BrokerCredentialsRevision)
        .where(col(BrokerCredentialsRevision.id) == _ROW_ID)
        .values(revision=col(BrokerCredentialsRevision.revision) + 1)
    )
    if moved.rowcount == 0:  # the row migration 0012 made is gone: make it again
        session.add(BrokerCredentialsRevision(id=_ROW_ID, revision=1))
        session.flush()


def credentials_revision(session: Session) -> int:
    """The current revision (0 when nothing was ever counted)."""
    revision = session.exec(
        select(BrokerCredentialsRevision.revision).where(
            col(BrokerCredentialsRevision.id) == _ROW_ID
        )
    ).first()
    return 0 if revision is None else int(revision)
