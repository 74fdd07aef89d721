"""Flask wiring: the web app enqueues, and every task runs inside the Flask app context.

python wakaq.py worker examples.flask_app:wakaq        # the worker
flask --app examples.flask_app run                     # the web app
"""

import os

from flask import Flask, current_app, jsonify

from wakaq import WakaQ

flask_app = Flask(__name__)
flask_app.config["GREETING"] = "hello"
wakaq = WakaQ(url=os.environ.get("WAKAQ_URL", "redis://127.0.0.1:6379/0"))


@wakaq.wrap_tasks_with
def in_app_context(fn, args, kwargs):
    with flask_app.app_context():
        return fn(*args, **kwargs)


@wakaq.task
def greet(name):
    print(current_app.config["GREETING"], name)


@flask_app.post("/greet/<name>")
def greet_view(name):
    return jsonify(id=greet.delay(name))
