"""Flask wiring: a view enqueues a task and returns its id; every task runs inside the Flask
app context (so `current_app`, extensions and their config work in tasks).

    python wakaq.py worker examples.flask_app:wakaq          # the worker
    flask --app examples.flask_app run                       # the web app, on port 5000
    curl -X POST http://127.0.0.1:5000/greet/bob             # {"id": "..."}, status 202

The route takes POST only (it changes state: it enqueues a task); a GET gets 405. Redis:
$WAKAQ_URL, else $REDIS_URL, else redis://127.0.0.1:6379/0.
"""

import os

from flask import Flask, current_app, jsonify

from wakaq import WakaQ

flask_app = Flask(__name__)
flask_app.config["GREETING"] = "hello"
wakaq = WakaQ(
    url=os.environ.get("WAKAQ_URL") or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
)


@wakaq.wrap_tasks_with
def in_app_context(fn, args, kwargs):
    with flask_app.app_context():
        return fn(*args, **kwargs)


@wakaq.task
def greet(name):
    print(current_app.config["GREETING"], name)


@flask_app.route("/greet/<name>", methods=["POST"])  # POST only: GET -> 405
def greet_view(name):
    task_id = greet.delay(name)  # returns at once; the worker runs the task
    return jsonify(id=task_id), 202  # 202 Accepted: queued, not done yet
