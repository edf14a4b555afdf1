import socket,sys,time,json,urllib.request
PORT=int(sys.argv[1])
b=json.dumps({"prompt":" a"*8000,"max_tokens":5}).encode()
s=socket.create_connection(("127.0.0.1",PORT)); s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"%len(b)+b)
time.sleep(0.5); s.close(); t=time.time()
time.sleep(0.6)
while json.loads(urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health").read())["busy"]: time.sleep(0.2)
h=json.loads(urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health").read())
print("worker stayed busy", round(time.time()-t,1), "s after the client left; generated", h["stats"]["generated_tokens"], "cancelled", h["stats"]["cancelled"])
