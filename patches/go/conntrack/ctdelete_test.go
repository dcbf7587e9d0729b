//go:build linux
// +build linux

/*
Copyright 2026 The Kubernetes Authors.

Licensed under the Apache License, Version 2.0 (the "License");
you may not use this file except in compliance with the License.
You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software
distributed under the License is distributed on an "AS IS" BASIS,
WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
See the License for the specific language governing permissions and
limitations under the License.
*/

package conntrack

import (
	"encoding/binary"
	"net/netip"
	"syscall"
	"testing"
)

func TestDeleteBatchAndAcks(t *testing.T) {
	fl := Flow{Proto: 17, Orig: Tuple{Src: netip.MustParseAddr("198.18.1.2"), Dst: netip.MustParseAddr("198.18.0.10"), SrcPort: 40000, DstPort: 53}}
	var b []byte
	var err error
	for seq := uint32(1); seq <= 3; seq++ {
		if b, err = appendDeleteRequest(b, seq, syscall.AF_INET, fl); err != nil {
			t.Fatal(err)
		}
	}
	msgs, err := splitMessages(b)
	if err != nil || len(msgs) != 3 {
		t.Fatalf("want 3 packed requests, got %d (%v)", len(msgs), err)
	}
	for i, m := range msgs {
		if m.typ != 1<<8|ipctnlMsgCtDelete || m.flags != syscall.NLM_F_REQUEST|syscall.NLM_F_ACK || m.seq != uint32(i+1) {
			t.Errorf("request %d: %+v", i, m)
		}
		attrs, _ := parseAttrs(m.payload[nfgenHdrLen:])
		proto, tuple, _ := parseTuple(attrs[0].data)
		if proto != 17 || tuple != fl.Orig {
			t.Errorf("request %d deletes %+v", i, tuple)
		}
	}
	ack := func(seq uint32, errno syscall.Errno) []byte {
		m := binary.NativeEndian.AppendUint32(nil, 36)
		m = binary.NativeEndian.AppendUint16(m, syscall.NLMSG_ERROR)
		m = binary.NativeEndian.AppendUint16(m, 0)
		m = binary.NativeEndian.AppendUint32(m, seq)
		m = binary.NativeEndian.AppendUint32(m, 0)
		m = binary.NativeEndian.AppendUint32(m, uint32(-int32(errno)))
		return append(m, make([]byte, 16)...)
	}
	acks := append(append(append(ack(1, 0), ack(2, syscall.ENOENT)...), ack(3, syscall.EPERM)...), ack(99, 0)...)
	outstanding := map[uint32]bool{1: true, 2: true, 3: true}
	deleted, firstErr, err := countAcks(acks, outstanding)
	if err != nil || deleted != 1 || firstErr == nil || len(outstanding) != 0 {
		t.Errorf("deleted=%d firstErr=%v err=%v outstanding=%v", deleted, firstErr, err, outstanding)
	}
}
