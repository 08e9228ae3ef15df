// The HTTP API with the signed-in token, and what the token's role may do.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export class Api {
  constructor(token) {
    this.token = token;
  }

  async request(method, path, body) {
    const headers = { Authorization: `Bearer ${this.token}`, Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(`/api/v1${path}`, {
        method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: "no-store",
      });
    } catch (err) {
      throw new ApiError(0, "network", `the service did not answer (${err.message})`);
    }
    const type = response.headers.get("Content-Type") || "";
    const data = type.includes("json") ? await response.json().catch(() => null) : null;
    if (!response.ok) {
      const error = data && data.error ? data.error : { code: String(response.status), message: response.statusText };
      throw new ApiError(response.status, error.code, error.message);
    }
    return data;
  }

  get(path) { return this.request("GET", path); }
  post(path, body) { return this.request("POST", path, body); }

  /** Every item of a paginated list (follows `next`). */
  async all(path, cap = 20000) {
    const items = [];
    let next = path;
    while (next && items.length < cap) {
      const page = await this.get(next);
      items.push(...page.items);
      next = page.next ? page.next.replace(/^\/api\/v1/, "") : null;
    }
    return items;
  }

  async blob(path) {
    const response = await fetch(`/api/v1${path}`, { headers: { Authorization: `Bearer ${this.token}` } });
    if (!response.ok) {
      const data = await response.json().catch(() => null);
      throw new ApiError(response.status, data?.error?.code ?? "", data?.error?.message ?? response.statusText);
    }
    return response.blob();
  }
}

/**
 * Who the token is and what it may do. Uses GET /me when the service has it; otherwise probes
 * the permission checks with requests that change nothing (an empty body is refused with 403
 * when the role may not, and with 400 when it may).
 */
export async function whoAmI(api) {
  try {
    const me = await api.get("/me");
    const perms = new Set(me.permissions || []);
    return { name: me.name, role: me.role, ack: perms.has("alarms"), custody: perms.has("custody"), plan: perms.has("routes") };
  } catch (err) {
    if (err.status === 401) throw err;
  }
  await api.get("/shipments?limit=1"); // 401 for a bad token
  const may = async (path) => {
    try {
      await api.post(path, {});
      return true;
    } catch (err) {
      if (err.status === 401) throw err;
      return err.status !== 403;
    }
  };
  const [ack, plan] = await Promise.all([may("/alarms/0/ack"), may("/routes/plan")]);
  let admin = false;
  try {
    await api.get("/tokens");
    admin = true;
  } catch { /* not an admin */ }
  const role = admin ? "admin" : ack ? "operator" : plan ? "planner" : "viewer";
  return { name: null, role, ack, custody: ack, plan };
}
