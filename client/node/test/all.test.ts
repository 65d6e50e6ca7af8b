/** The whole Node suite in one process (tests/integration/test_node_client.py runs it). */
import "./errors.test.js";
import "./transport.test.js";
import "./client.test.js";
import "./example.test.js";
import "./tls.test.js";
