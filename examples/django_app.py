"""Django wiring, in one file for the example: settings, a task, a view that enqueues it, and
the URL. In a project, put the tasks in myproject/tasks.py (the part from `wakaq = ...` to the
task) and the view in a views.py that imports them, and set DJANGO_SETTINGS_MODULE:

    DJANGO_SETTINGS_MODULE=myproject.settings python wakaq.py worker myproject.tasks:wakaq

This example runs as it is:

    python wakaq.py worker examples.django_app:wakaq         # the worker
    python -m examples.django_app runserver                  # the web app, on port 8000
    curl -X POST http://127.0.0.1:8000/count-tables/         # {"id": "..."}, status 202

The view takes POST only (it enqueues a task); a GET gets 405. With Django's
CsrfViewMiddleware (a real project has it), a browser form sends the CSRF token as usual; an
endpoint for other services is marked @csrf_exempt and authenticated another way. Redis:
$WAKAQ_URL, else $REDIS_URL, else redis://127.0.0.1:6379/0.
"""

import os
import sys

import django
from django.conf import settings

if not settings.configured and "DJANGO_SETTINGS_MODULE" not in os.environ:
    settings.configure(
        DEBUG=True,
        ALLOWED_HOSTS=["127.0.0.1", "localhost", "testserver"],
        ROOT_URLCONF="examples.django_app",
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        LOGGING={
            "version": 1,
            "handlers": {"console": {"class": "logging.StreamHandler"}},
            "root": {"handlers": ["console"], "level": "INFO"},
        },  # wakaq's log lines survive an app's LOGGING
    )
django.setup()  # at import: the worker parent loads Django once, its children inherit it

from django.db import close_old_connections, connection, connections  # noqa: E402
from django.http import JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.http import require_POST  # noqa: E402

from wakaq import WakaQ  # noqa: E402

wakaq = WakaQ(
    url=os.environ.get("WAKAQ_URL") or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
)


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


@require_POST  # POST only: GET -> 405
def count_tables_view(request):
    task_id = count_tables.delay()  # returns at once; the worker runs the task
    return JsonResponse({"id": task_id}, status=202)  # 202 Accepted: queued, not done yet


urlpatterns = [path("count-tables/", count_tables_view)]

if __name__ == "__main__":
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
