import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  ApiError,
  cancelTask,
  generateBody,
  pageRelativeUrl,
  postGenerate,
} from "../../public/js/api.mjs";
import { itemKey } from "../../public/js/custom-ui/carousel-display.mjs";
import { carouselItems } from "../../public/js/main.mjs";

/** A fetch that answers once with `status` and `body`, recording the request. */
function fakeFetch(status, body, { statusText = "" } = {}) {
  const calls = [];
  const impl = async (url, init) => {
    calls.push({ url, init });
    const text = typeof body === "string" ? body : JSON.stringify(body);
    return new Response(text, { status, statusText });
  };
  return { impl, calls };
}

describe("pageRelativeUrl", () => {
  test("root-relative daemon URLs become page-relative", () => {
    assert.equal(pageRelativeUrl("/image/abc.png"), "image/abc.png");
    assert.equal(pageRelativeUrl("image/abc.png"), "image/abc.png");
  });

  test("absolute URLs are left alone", () => {
    assert.equal(pageRelativeUrl("https://cdn.example/x.png"), "https://cdn.example/x.png");
    assert.equal(pageRelativeUrl("//cdn.example/x.png"), "//cdn.example/x.png");
    assert.equal(pageRelativeUrl("data:image/png;base64,AA"), "data:image/png;base64,AA");
  });
});

describe("generateBody", () => {
  test("empty optional fields are left out", () => {
    const body = JSON.parse(generateBody({ prompt: "a cat", workflow: "txt2img", seed: "", name: " " }));
    assert.deepEqual(body, { prompt: "a cat", workflow: "txt2img" });
  });

  test("a numeric seed is a JSON number and a name is trimmed", () => {
    const body = JSON.parse(generateBody({ prompt: "p", seed: " 42 ", name: " Kit " }));
    assert.deepEqual(body, { prompt: "p", name: "Kit", seed: 42 });
  });

  test("seeds past 2**53 keep every digit", () => {
    const text = generateBody({ prompt: "p", seed: "18446744073709551615" });
    assert.match(text, /"seed":18446744073709551615}$/);
    assert.doesNotThrow(() => JSON.parse(text));
    assert.equal(generateBody({ prompt: "p", seed: "007" }), '{"prompt":"p","seed":7}');
  });

  test("a seed that is not a number goes as typed, for the daemon to refuse", () => {
    assert.deepEqual(JSON.parse(generateBody({ prompt: "p", seed: "abc" })), { prompt: "p", seed: "abc" });
  });
});

describe("postGenerate", () => {
  const accepted = { taskId: "t1", status: "queued", progressUrl: "/progress/t1", statusUrl: "/tasks/t1" };

  test("POSTs JSON to the page-relative 'generate' and returns the 202 reply", async () => {
    const { impl, calls } = fakeFetch(202, accepted);
    const reply = await postGenerate({ prompt: "a cat", seed: "1" }, { fetch: impl });
    assert.deepEqual(reply, accepted);
    assert.equal(calls[0].url, "generate");
    assert.equal(calls[0].init.method, "POST");
    assert.equal(calls[0].init.headers["Content-Type"], "application/json");
    assert.deepEqual(JSON.parse(calls[0].init.body), { prompt: "a cat", seed: 1 });
  });

  test("a 4xx carries the daemon's error message and details", async () => {
    const { impl } = fakeFetch(400, {
      error: { message: "seed: must be an integer from 0 to 18446744073709551615", details: { field: "seed" } },
    });
    await assert.rejects(postGenerate({ prompt: "p", seed: "x" }, { fetch: impl }), (err) => {
      assert.ok(err instanceof ApiError);
      assert.equal(err.status, 400);
      assert.match(err.message, /^seed: must be an integer/);
      assert.deepEqual(err.details, { field: "seed" });
      return true;
    });
  });

  test("a non-JSON error page is described by its status", async () => {
    const { impl } = fakeFetch(502, "<html>bad gateway</html>", { statusText: "Bad Gateway" });
    await assert.rejects(postGenerate({ prompt: "p" }, { fetch: impl }), {
      name: "ApiError",
      message: "The server answered 502 Bad Gateway",
    });
  });

  test("a network failure says the server is unreachable", async () => {
    const impl = async () => {
      throw new TypeError("Failed to fetch");
    };
    await assert.rejects(postGenerate({ prompt: "p" }, { fetch: impl }), {
      message: "Could not reach the server",
    });
  });

  test("a success without a taskId is an error, not a silent no-op", async () => {
    const { impl } = fakeFetch(202, { status: "queued" });
    await assert.rejects(postGenerate({ prompt: "p" }, { fetch: impl }), /no task id/);
  });
});

test("cancelTask sends DELETE to the page-relative task URL", async () => {
  const { impl, calls } = fakeFetch(202, { taskId: "a/b", status: "cancelling", cancelled: true });
  const reply = await cancelTask("a/b", { fetch: impl });
  assert.equal(calls[0].url, "tasks/a%2Fb");
  assert.equal(calls[0].init.method, "DELETE");
  assert.equal(reply.cancelled, true);
});

describe("API tokens", () => {
  const accepted = { taskId: "t1", status: "queued", progressUrl: "/progress/t1", statusUrl: "/tasks/t1" };
  const unauthorized = { error: { message: "this daemon needs an API token", details: null } };

  /** A fetch answering each request in turn, recording each request's Authorization. */
  function scriptedFetch(...answers) {
    const seen = [];
    const impl = async (_url, init) => {
      seen.push(init.headers.Authorization ?? null);
      const [status, body] = answers.length > 1 ? answers.shift() : answers[0];
      return new Response(JSON.stringify(body), { status });
    };
    return { impl, seen };
  }

  function memoryStore(token = null) {
    return {
      token,
      get() {
        return this.token;
      },
      set(value) {
        this.token = value;
      },
    };
  }

  test("a 401 asks for a token, retries with it, and keeps it once accepted", async () => {
    const { impl, seen } = scriptedFetch([401, unauthorized], [202, accepted]);
    const tokens = memoryStore();
    const asked = [];
    const askToken = (rejected) => {
      asked.push(rejected);
      return " s3cret-token ";
    };
    const reply = await postGenerate({ prompt: "p" }, { fetch: impl, tokens, askToken });
    assert.equal(reply.taskId, "t1");
    assert.deepEqual(seen, [null, "Bearer s3cret-token"]);
    assert.deepEqual(asked, [false]);
    assert.equal(tokens.token, "s3cret-token");
  });

  test("a stored token is sent without asking", async () => {
    const { impl, seen } = scriptedFetch([202, { taskId: "t1", status: "cancelling", cancelled: true }]);
    const askToken = () => assert.fail("asked although a token was stored");
    await cancelTask("t1", { fetch: impl, tokens: memoryStore("kept"), askToken });
    assert.deepEqual(seen, ["Bearer kept"]);
  });

  test("a rejected stored token is dropped and the user asked again", async () => {
    const { impl, seen } = scriptedFetch([401, unauthorized], [202, accepted]);
    const tokens = memoryStore("old");
    const asked = [];
    const askToken = (rejected) => {
      asked.push(rejected);
      return "new";
    };
    await postGenerate({ prompt: "p" }, { fetch: impl, tokens, askToken });
    assert.deepEqual(seen, ["Bearer old", "Bearer new"]);
    assert.deepEqual(asked, [true]);
    assert.equal(tokens.token, "new");
  });

  test("cancelling the question leaves the 401 as the error, and nothing stored", async () => {
    const { impl, seen } = scriptedFetch([401, unauthorized]);
    const tokens = memoryStore();
    await assert.rejects(postGenerate({ prompt: "p" }, { fetch: impl, tokens, askToken: () => null }), {
      name: "ApiError",
      status: 401,
      message: "this daemon needs an API token",
    });
    assert.deepEqual(seen, [null]);
    assert.equal(tokens.token, null);
  });

  test("wrong tokens are asked for a bounded number of times", async () => {
    const { impl, seen } = scriptedFetch([401, unauthorized]);
    const tokens = memoryStore();
    await assert.rejects(postGenerate({ prompt: "p" }, { fetch: impl, tokens, askToken: () => "wrong" }), {
      status: 401,
    });
    assert.equal(seen.length, 4);
    assert.equal(tokens.token, null);
  });
});

describe("carouselItems", () => {
  const result = {
    imageUrl: "/image/a.png",
    imageUrls: ["/image/a.png", "/image/b.png"],
    prompt: "a cat",
    seed: 5,
    name: "Kit",
    workflow: "txt2img",
    description: null,
    uid: 17,
  };

  test("one page-relative item per image, with the request's fields", () => {
    const items = carouselItems(result, "t1");
    assert.deepEqual(
      items.map((i) => i.image),
      ["image/a.png", "image/b.png"],
    );
    assert.deepEqual(
      { ...items[0], image: undefined, uid: undefined },
      { image: undefined, prompt: "a cat", seed: 5, name: "Kit", workflow: "txt2img", description: null, uid: undefined, taskId: "t1" },
    );
    assert.notEqual(itemKey(items[0]), itemKey(items[1]), "distinct keys for the carousel");
  });

  test("tasks created in the same millisecond (one uid) have distinct keys", () => {
    // uid is the creation time in ms: two tasks may share it; their images may not.
    const first = carouselItems({ imageUrl: "/image/a.png", uid: 17 }, "t1");
    const second = carouselItems({ imageUrl: "/image/b.png", uid: 17 }, "t2");
    assert.notEqual(itemKey(first[0]), itemKey(second[0]));
  });

  test("the seed's single imageUrl is enough", () => {
    const items = carouselItems({ imageUrl: "/image/a.png", uid: 1 }, "t1");
    assert.deepEqual(items.map((i) => [i.image, i.uid]), [["image/a.png", 1]]);
  });
});
