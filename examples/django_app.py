"""Django wiring, in one file for the example. In a project, put the part below the
settings in myproject/tasks.py and set DJANGO_SETTINGS_MODULE instead of configure():

    DJANGO_SETTINGS_MODULE=myproject.settings python wakaq.py worker myproject.tasks:wakaq
"""

import os

import django
from django.conf import settings

if not settings.configured and "DJANGO_SETTINGS_MODULE" not in os.environ:
    settings.configure(
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        LOGGING={
            "version": 1,
            "handlers": {"console": {"class": "logging.StreamHandler"}},
            "root": {"handlers": ["console"], "level": "INFO"},
        },
    )  # wakaq's lines survive
django.setup()  # at import: the worker parent loads Django once, its children inherit it

from django.db import close_old_connections, connection, connections  # noqa: E402

from wakaq import WakaQ  # noqa: E402

wakaq = WakaQ(url=os.environ.get("WAKAQ_URL", "redis://127.0.0.1:6379/0"))


@wakaq.after_worker_started
def no_shared_sockets():
    connections.close_all()  # a child never uses a database socket the parent opened


@wakaq.before_task_started
@wakaq.after_task_finished
def tidy_connections():
    close_old_connections()  # what Django does around each request


@wakaq.task
def count_tables():
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM sqlite_master")
        print("tables:", cursor.fetchone()[0])
