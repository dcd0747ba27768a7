"""The live window (vispy) on the daemon's results stream: model.py (numpy), client.py (zmq), window.py (vispy), app.py (loops), launch.py (spawn)."""
