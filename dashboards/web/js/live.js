// The live stream (GET /api/v1/live over a WebSocket), reconnecting with backoff. A server that
// drops a slow client closes with 1013: we reconnect and ask the page to resynchronise.

export class Live {
  constructor(token, { onReadings, onAlarm, onStatus, onResync }) {
    this.token = token;
    this.handlers = { onReadings, onAlarm, onStatus, onResync };
    this.socket = null;
    this.delay = 1000;
    this.stopped = false;
    this.connected = false;
    this.everConnected = false;
  }

  start() {
    this.stopped = false;
    this.open();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    if (this.socket) this.socket.close(1000);
  }

  open() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const url = `${scheme}://${location.host}/api/v1/live?token=${encodeURIComponent(this.token)}`;
    const socket = new WebSocket(url);
    this.socket = socket;
    socket.onopen = () => {
      this.delay = 1000;
    };
    socket.onmessage = (event) => {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      if (message.type === "hello") {
        const again = this.everConnected;
        this.connected = this.everConnected = true;
        this.handlers.onStatus?.(true, "live");
        if (again) this.handlers.onResync?.();
      } else if (message.type === "readings") {
        this.handlers.onReadings?.(message.data);
      } else if (message.type === "alarm") {
        this.handlers.onAlarm?.(message.data);
      }
    };
    socket.onclose = (event) => {
      this.connected = false;
      if (this.stopped) return;
      const why = event.code === 1013 ? "fell behind; reconnecting" : "disconnected; reconnecting";
      this.handlers.onStatus?.(false, why);
      this.timer = setTimeout(() => this.open(), event.code === 1013 ? 200 : this.delay);
      this.delay = Math.min(this.delay * 2, 15000);
    };
  }
}
