"""A Hub-compatible HTTP server on 127.0.0.1 for tests: the endpoints `huggingface_hub` calls to create a repo,
commit files (preupload, commit as NDJSON) and download them (repo info, resolve). Every file is offered as a
regular (inline) upload, so no LFS/Xet transfer is emulated. It records the files and request headers it received."""
import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml


class HubState:
    def __init__(self, token: str | None = None):
        self.token = token  # the one token accepted (None: any bearer token)
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "files": {path: bytes}, "commits": [...]}
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, lower-cased headers)
        self.lock = threading.Lock()


def _handler(state: HubState):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _authorized(self) -> bool:
            auth = self.headers.get("Authorization", "")
            if not auth.startswith("Bearer ") or (state.token is not None and auth != f"Bearer {state.token}"):
                self._reply(401, {"error": "Invalid credentials in Authorization header"})
                return False
            return True

        def _file(self, head: bool) -> bool:
            """GET/HEAD /{org}/{name}/resolve/{revision}/{path}: a stored file, with the headers the client reads."""
            parts = self.path.split("?")[0].strip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                return False
            repo = state.repos.get(f"{parts[0]}/{parts[1]}")
            data = repo and repo["files"].get("/".join(parts[4:]))
            if data is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return True
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", f"{len(repo['commits']):040x}")
            self.end_headers()
            if not head:
                self.wfile.write(data)
            return True

        def do_HEAD(self):
            with state.lock:
                state.requests.append(("HEAD", self.path, {k.lower(): v for k, v in self.headers.items()}))
            if not self._file(head=True):
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        def do_GET(self):
            with state.lock:
                state.requests.append(("GET", self.path, {k.lower(): v for k, v in self.headers.items()}))
            parts = self.path.split("?")[0].strip("/").split("/")
            if self.path.startswith("/api/whoami"):
                if self._authorized():
                    self._reply(200, {"name": "tester", "type": "user", "auth": {"type": "access_token"}})
                return
            if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "tree":
                repo = state.repos.get(f"{parts[2]}/{parts[3]}", {"files": {}})
                self._reply(200, [{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                                  for f, d in repo["files"].items()])
                return
            if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "revision":
                repo = state.repos.get(f"{parts[2]}/{parts[3]}")
                if repo is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RepoNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._reply(200, {"id": f"{parts[2]}/{parts[3]}", "sha": f"{len(repo['commits']):040x}",
                                  "private": repo["private"], "siblings": [{"rfilename": f} for f in repo["files"]]})
                return
            if self._file(head=False):
                return
            self._reply(404, {"error": f"not emulated: GET {self.path}"})

        def do_POST(self):
            body = self._body()
            with state.lock:
                state.requests.append(("POST", self.path, {k.lower(): v for k, v in self.headers.items()}))
            if not self._authorized():
                return
            parts = self.path.split("?")[0].strip("/").split("/")
            if parts == ["api", "validate-yaml"]:  # the model card's front matter
                content = json.loads(body)["content"]
                front = content.split("---")[1] if content.startswith("---") else ""
                try:
                    yaml.safe_load(front)
                except yaml.YAMLError as e:
                    self._reply(400, {"errors": [{"message": str(e)}], "warnings": []})
                    return
                self._reply(200, {"errors": [], "warnings": []})
                return
            if parts[:3] == ["api", "repos", "create"]:
                req = json.loads(body)
                repo_id = f"{req.get('organization') or 'tester'}/{req['name']}"
                with state.lock:
                    state.repos.setdefault(repo_id, {"private": req.get("visibility") == "private",
                                                     "files": {}, "commits": []})
                self._reply(200, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})
                return
            if len(parts) >= 6 and parts[0] == "api" and parts[1] == "models":
                repo_id, action = f"{parts[2]}/{parts[3]}", parts[4]
                if repo_id not in state.repos:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RepoNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if action == "preupload":
                    files = json.loads(body)["files"]
                    self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                for f in files]})
                    return
                if action == "commit":
                    self._commit(repo_id, body)
                    return
            self._reply(404, {"error": f"not emulated: POST {self.path}"})

        def _commit(self, repo_id: str, body: bytes) -> None:
            files, message = {}, ""
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    message = item["value"].get("summary", "")
                elif item["key"] == "file":
                    value = item["value"]
                    content = value["content"]
                    files[value["path"]] = base64.b64decode(content) if value.get("encoding") == "base64" \
                        else content.encode()
                else:
                    self._reply(400, {"error": f"not emulated: commit item {item['key']}"})
                    return
            with state.lock:
                repo = state.repos[repo_id]
                repo["files"].update(files)
                repo["commits"].append(message)
                oid = f"{len(repo['commits']):040x}"
            self._reply(200, {"success": True, "commitOid": oid,
                              "commitUrl": f"http://{self.headers['Host']}/{repo_id}/commit/{oid}"})

    return Handler


class HubServer:
    """Context manager: a running server; `.url` for HF_ENDPOINT, `.state` for what it received."""

    def __init__(self, token: str | None = None):
        self.state = HubState(token)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
