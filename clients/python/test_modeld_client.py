"""Tests of modeld_client against a running daemon named by MODELD_SOCKET.

The Rust end-to-end suite starts a daemon and runs this file with python3.
"""

import os
import threading
import unittest

import modeld_client


class ClientTest(unittest.TestCase):
    def test_call_status(self):
        status = modeld_client.call("status")
        self.assertIsInstance(status["pid"], int)

    def test_register_list_remove(self):
        with modeld_client.Client(timeout=30) as client:
            client.call("models.register", {"name": "py-model", "repo": "org/py-model"})
            names = [m["name"] for m in client.call("models.list")["models"]]
            self.assertIn("py-model", names)
            client.call("models.remove", {"name": "py-model"})

    def test_errors_carry_kind_and_field(self):
        with self.assertRaises(modeld_client.ModeldError) as caught:
            modeld_client.call("models.register", {"name": "../x", "repo": "a/b"})
        self.assertEqual(caught.exception.kind, "invalid_params")
        self.assertEqual(caught.exception.data["field"], "name")

    def test_stream_events(self):
        def register_and_remove():
            modeld_client.call("models.register", {"name": "streamed", "repo": "org/s"})
            modeld_client.call("models.remove", {"name": "streamed"})

        with modeld_client.Client(timeout=30) as client:
            events = client.subscribe("events.subscribe")
            writer = threading.Thread(target=register_and_remove)
            writer.start()
            seen = []
            for event in events:
                seen.append((event["event"], event["name"]))
                if len(seen) == 2:
                    break
            writer.join()
        self.assertEqual(seen, [("model_registered", "streamed"), ("model_removed", "streamed")])

    @unittest.skipUnless(os.environ.get("MODELD_PULL_MODEL"), "needs a registered model and a hub")
    def test_stream_pull_progress(self):
        events = list(modeld_client.stream("models.pull", {"name": os.environ["MODELD_PULL_MODEL"]}))
        self.assertEqual(events[0]["event"], "start")
        self.assertEqual(events[-1]["event"], "done")
        self.assertTrue(events[-1]["done"])
        self.assertEqual(events[-1]["source"], "hub")
        self.assertGreater(events[0]["total_bytes"], 0)

    @unittest.skipUnless(os.environ.get("MODELD_PULL_MODEL"), "needs a registered model and a hub")
    def test_stream_generate(self):
        events = list(modeld_client.stream("generate", {
            "model": os.environ["MODELD_PULL_MODEL"], "prompt": "The application uses a", "max_tokens": 5}))
        self.assertEqual([e["event"] for e in events], ["token"] * 5 + ["done"])
        self.assertEqual(events[-1]["text"], "".join(e["text"] for e in events[:-1]))

    @unittest.skipUnless(os.environ.get("MODELD_IMAGE_MODEL"), "needs a registered image model")
    def test_generate_image_saves_pngs(self):
        import tempfile
        from generate_image import generate_image

        steps = []
        with tempfile.TemporaryDirectory() as out:
            paths = generate_image(
                os.environ["MODELD_IMAGE_MODEL"], "a red cube", out, size="64x64", steps=2,
                seed=7, count=2, progress=lambda step, total: steps.append((step, total)))
            self.assertEqual(len(paths), 2)
            for path in paths:
                with open(path, "rb") as f:
                    self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        # The pictures of one request are denoised together: one event a step.
        self.assertEqual(steps, [(1, 2), (2, 2)])

    def test_not_running_is_a_clear_error(self):
        with self.assertRaises(ConnectionError) as caught:
            modeld_client.Client("/nonexistent/modeld.sock")
        self.assertIn("not running", str(caught.exception))


if __name__ == "__main__":
    unittest.main()
