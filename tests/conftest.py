import pytest

from config import load_config
from ingestion_api import create_app
from processor import Processor
from shared_queue import open_queue
from store import open_store


@pytest.fixture
def config(tmp_path):
    return load_config(environ={}, data_dir=str(tmp_path))


@pytest.fixture
def app(config):
    return create_app(config)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def drain(config):
    """Run the processor in this process until the queue is empty; returns it."""
    def drain_queue(**overrides):
        settings = config.with_overrides(**overrides) if overrides else config
        processor = Processor(open_queue(settings), open_store(settings), settings)
        processor.start()
        processor.run(once=True)
        return processor
    return drain_queue
